"""Checks how a saga ended, from `sagactl --output json get|start --wait` on standard input:

    check-saga.py STATUS [STEP=STEP_STATUS[:ERROR_CODE]]...

e.g. `check-saga.py COMPENSATED create_order=COMPENSATED charge_payment=FAILED:INSUFFICIENT_FUNDS`.
A step's ERROR_CODE must begin its last error (the participant's refusal), and the saga's
failure reason must name it. Prints the saga in one line; exits 1 saying what differs.
"""

import json
import sys


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    saga = json.loads(sys.stdin.read())
    expected_status, step_rules = sys.argv[1], sys.argv[2:]
    steps = {step["name"]: step for step in saga["steps"]}
    wrong = []
    if saga["status"] != expected_status:
        wrong.append(f"status {saga['status']}, expected {expected_status}")
    for rule in step_rules:
        name, _, want = rule.partition("=")
        want_status, _, code = want.partition(":")
        step = steps.get(name)
        if step is None:
            wrong.append(f"no step {name}")
            continue
        if step["status"] != want_status:
            wrong.append(f"step {name} {step['status']}, expected {want_status}")
        if code:
            if not step["last_error"].startswith(code):
                wrong.append(f"step {name}'s last error {step['last_error']!r}, expected {code}")
            if code not in (saga.get("failure_reason") or ""):
                wrong.append(f"failure reason {saga.get('failure_reason')!r} lacks {code}")
    summary = ", ".join(f"{s['name']} {s['status']}" for s in saga["steps"])
    reason = f" ({saga['failure_reason']})" if saga.get("failure_reason") else ""
    print(f"{saga['saga_id']} {saga['status']}{reason}: {summary}")
    if wrong:
        print("NOT as expected: " + "; ".join(wrong))
        sys.exit(1)


if __name__ == "__main__":
    main()
