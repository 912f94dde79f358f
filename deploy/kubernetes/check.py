"""Checks a rendered kustomization (the YAML stream of `kustomize build`) for what the JSON
schemas cannot see. deploy/test.sh runs it after kubernetes-validate:

    python check.py RENDERED.yaml SAGA_DEFS_DIR [--grpc-probes] [--secrets-elsewhere]

- every pod runs as non-root with seccomp RuntimeDefault, every container from an image with a
  version tag (or digest), with a read-only root, no privilege escalation, ALL capabilities
  dropped, requests and limits of CPU and memory, and readiness and liveness probes (gRPC probes on sagad with --grpc-probes);
- sagad runs at least two replicas, a PodDisruptionBudget and a Service select its pods, and
  every Service's selector matches some pod template and names ports the pods have;
- every ConfigMap, Secret and ServiceAccount a pod refers to is in the output (kustomize renamed
  the generated ones consistently; Secrets may come from elsewhere with --secrets-elsewhere,
  as for the base, whose overlays make them), and the sagad-defs ConfigMap holds exactly the files of
  saga-defs/ with their contents.

Prints one line per object checked; exits 1 naming each problem.
"""

import pathlib
import sys

import yaml

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def pod_templates(objects):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj, obj["spec"]["template"]


def check_pod(obj, template, grpc_probes):
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    spec = template["spec"]
    pod_security = spec.get("securityContext", {})
    if pod_security.get("runAsNonRoot") is not True:
        problem(where, "pod securityContext.runAsNonRoot is not true")
    if not isinstance(pod_security.get("runAsUser"), int) or pod_security["runAsUser"] == 0:
        problem(where, "pod securityContext.runAsUser is not a non-zero number")
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem(where, "pod seccompProfile is not RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        problem(where, "the service account token is mounted")
    for container in spec.get("initContainers", []) + spec["containers"]:
        at = f"{where} container {container['name']}"
        image = container.get("image", "")
        tag = image.rpartition("/")[2].partition("@")[0].partition(":")[2]
        if "@" not in image and tag in ("", "latest"):
            problem(at, f"image {image!r} has no version tag")
        security = container.get("securityContext", {})
        if security.get("readOnlyRootFilesystem") is not True:
            problem(at, "readOnlyRootFilesystem is not true")
        if security.get("allowPrivilegeEscalation") is not False:
            problem(at, "allowPrivilegeEscalation is not false")
        if security.get("privileged", False):
            problem(at, "privileged")
        if security.get("capabilities", {}).get("drop") != ["ALL"]:
            problem(at, "capabilities do not drop ALL")
        if security.get("capabilities", {}).get("add"):
            problem(at, "capabilities are added")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    problem(at, f"no {kind}.{resource}")
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                problem(at, f"no {probe}")
        if grpc_probes and container["name"] == "sagad":
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if "grpc" not in container.get(probe, {}):
                    problem(at, f"{probe} is not a gRPC probe")
            readiness = container.get("readinessProbe", {}).get("grpc", {})
            if readiness.get("service") != "sagad.v1.SagaOrchestrator":
                problem(at, "readiness does not ask for sagad.v1.SagaOrchestrator")


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_references(objects, missing_secrets_allowed):
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    for obj, template in pod_templates(objects):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = template["spec"]
        wanted = []
        if "serviceAccountName" in spec:
            wanted.append(("ServiceAccount", spec["serviceAccountName"]))
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                wanted.append(("ConfigMap", volume["configMap"]["name"]))
            if "secret" in volume:
                wanted.append(("Secret", volume["secret"]["secretName"]))
        for container in spec["containers"]:
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "secretKeyRef" in source:
                    wanted.append(("Secret", source["secretKeyRef"]["name"]))
                if "configMapKeyRef" in source:
                    wanted.append(("ConfigMap", source["configMapKeyRef"]["name"]))
            mounts = {mount["name"] for mount in container.get("volumeMounts", [])}
            volumes = {volume["name"] for volume in spec.get("volumes", [])}
            volumes |= {c["metadata"]["name"] for c in obj["spec"].get("volumeClaimTemplates", [])}
            for mount in mounts - volumes:
                problem(where, f"mounts volume {mount}, which the pod lacks")
        for kind, name in wanted:
            if kind == "Secret" and missing_secrets_allowed:
                continue
            if (kind, name) not in names:
                problem(where, f"refers to {kind} {name}, which is not in the output")


def check_services(objects):
    templates = [(obj, template) for obj, template in pod_templates(objects)]
    for service in (obj for obj in objects if obj["kind"] == "Service"):
        where = f"Service/{service['metadata']['name']}"
        selector = service["spec"].get("selector", {})
        chosen = [t for _, t in templates if matches(selector, t["metadata"].get("labels", {}))]
        if not chosen:
            problem(where, f"selects no pod template ({selector})")
            continue
        port_names = {
            port.get("name")
            for t in chosen
            for container in t["spec"]["containers"]
            for port in container.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            target = port.get("targetPort")
            if isinstance(target, str) and target not in port_names:
                problem(where, f"targets port {target}, which its pods do not name")


def check_sagad(objects, defs_dir):
    deployments = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "sagad"]
    if len(deployments) != 1:
        problem("sagad", f"{len(deployments)} Deployments named sagad")
        return
    sagad = deployments[0]
    if sagad["spec"].get("replicas", 1) < 2:
        problem("Deployment/sagad", "fewer than 2 replicas")
    labels = sagad["spec"]["template"]["metadata"]["labels"]
    budgets = [
        o
        for o in objects
        if o["kind"] == "PodDisruptionBudget"
        and matches(o["spec"]["selector"].get("matchLabels", {}), labels)
    ]
    if not budgets:
        problem("Deployment/sagad", "no PodDisruptionBudget selects its pods")
    if not any(
        o["kind"] == "Service" and matches(o["spec"].get("selector", {}), labels) for o in objects
    ):
        problem("Deployment/sagad", "no Service selects its pods")
    defs_maps = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("sagad-defs")
    ]
    if len(defs_maps) != 1:
        problem("sagad-defs", f"{len(defs_maps)} ConfigMaps named sagad-defs-*")
        return
    data = defs_maps[0].get("data", {})
    files = {p.name: p.read_text() for p in pathlib.Path(defs_dir).iterdir() if p.is_file()}
    for name in sorted(files.keys() - data.keys()):
        problem("ConfigMap/sagad-defs", f"lacks {name} of {defs_dir} (list it in base/kustomization.yaml)")
    for name in sorted(data.keys() - files.keys()):
        problem("ConfigMap/sagad-defs", f"holds {name}, which {defs_dir} does not")
    for name in sorted(data.keys() & files.keys()):
        if data[name] != files[name]:
            problem("ConfigMap/sagad-defs", f"{name} differs from {defs_dir}/{name}")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        sys.exit(__doc__)
    rendered, defs_dir = args
    objects = [o for o in yaml.safe_load_all(pathlib.Path(rendered).read_text()) if o]
    grpc_probes = "--grpc-probes" in sys.argv
    for obj, template in pod_templates(objects):
        check_pod(obj, template, grpc_probes)
    check_references(objects, "--secrets-elsewhere" in sys.argv)
    check_services(objects)
    check_sagad(objects, defs_dir)
    if problems:
        for line in problems:
            print(f"FAIL {rendered}: {line}")
        sys.exit(1)
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    print(f"ok {rendered}: {len(objects)} objects ({', '.join(kinds)})")


if __name__ == "__main__":
    main()
