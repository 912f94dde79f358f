/*
 * grpc-health-check: asks a gRPC server over plaintext HTTP/2 for grpc.health.v1.Health/Check
 * and exits 0 when it answers SERVING.
 *
 *   grpc-health-check [-t SECONDS] ADDRESS:PORT [SERVICE]
 *
 * ADDRESS is an IPv4 or IPv6 literal ([::1]:50051); SERVICE defaults to "" (the server as a
 * whole). Exit status: 0 SERVING; 1 any other answer (NOT_SERVING, SERVICE_UNKNOWN, an error
 * status, a reset stream); 2 a bad argument, no connection, or no answer within the time
 * (default 3 s).
 *
 * The runtime images have no shell and no other client, and sagad and the demo participants
 * both serve grpc.health.v1: this is what their container health checks run. It speaks the
 * least of HTTP/2 (RFC 9113) such a call needs: the preface, one request stream whose headers
 * are HPACK literals (no Huffman coding, no dynamic table), and a reading of the reply's frames
 * that decodes only the DATA of that stream. Plaintext only: a server with --tls-cert is probed
 * some other way (its HTTP /readyz for sagad).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum { FRAME_DATA = 0, FRAME_HEADERS = 1, FRAME_RST_STREAM = 3, FRAME_SETTINGS = 4,
       FRAME_PING = 6, FRAME_GOAWAY = 7 };
enum { FLAG_END_STREAM = 0x1, FLAG_ACK = 0x1, FLAG_END_HEADERS = 0x4, FLAG_PADDED = 0x8 };

static const char *target = "";

static void on_alarm(int signal_number) {
    (void)signal_number;
    static const char message[] = "grpc-health-check: no answer in time\n";
    ssize_t ignored = write(STDERR_FILENO, message, sizeof message - 1);
    (void)ignored;
    _exit(2);
}

static void fail(int status, const char *what) {
    if (errno != 0) {
        fprintf(stderr, "grpc-health-check: %s %s: %s\n", target, what, strerror(errno));
    } else {
        fprintf(stderr, "grpc-health-check: %s %s\n", target, what);
    }
    exit(status);
}

static void send_all(int fd, const unsigned char *bytes, size_t length) {
    while (length > 0) {
        ssize_t sent = send(fd, bytes, length, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            fail(2, "send");
        }
        bytes += sent;
        length -= (size_t)sent;
    }
}

static void receive_all(int fd, unsigned char *bytes, size_t length) {
    while (length > 0) {
        ssize_t got = recv(fd, bytes, length, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            if (got == 0) errno = 0;
            fail(2, "closed the connection before answering");
        }
        bytes += got;
        length -= (size_t)got;
    }
}

/* A growing byte buffer for the request. */
struct buffer {
    unsigned char bytes[1024];
    size_t length;
};

static void put(struct buffer *buffer, const void *bytes, size_t length) {
    if (buffer->length + length > sizeof buffer->bytes) {
        errno = 0;
        fail(2, "request too long (service name or address)");
    }
    memcpy(buffer->bytes + buffer->length, bytes, length);
    buffer->length += length;
}

static void put_byte(struct buffer *buffer, unsigned char byte) { put(buffer, &byte, 1); }

/* An HPACK integer (RFC 7541 5.1) whose first byte carries `flags` above a `prefix`-bit field. */
static void put_integer(struct buffer *buffer, unsigned char flags, int prefix, size_t value) {
    size_t limit = ((size_t)1 << prefix) - 1;
    if (value < limit) {
        put_byte(buffer, (unsigned char)(flags | value));
        return;
    }
    put_byte(buffer, (unsigned char)(flags | limit));
    value -= limit;
    while (value >= 128) {
        put_byte(buffer, (unsigned char)(value % 128 + 128));
        value /= 128;
    }
    put_byte(buffer, (unsigned char)value);
}

/* An HPACK string literal, not Huffman-coded. */
static void put_string(struct buffer *buffer, const char *text) {
    put_integer(buffer, 0x00, 7, strlen(text));
    put(buffer, text, strlen(text));
}

/* A literal header field without indexing (RFC 7541 6.2.2): by static-table name index, or
 * with the name written out when `name_index` is 0. */
static void put_header(struct buffer *buffer, size_t name_index, const char *name,
                       const char *value) {
    put_integer(buffer, 0x00, 4, name_index);
    if (name_index == 0) put_string(buffer, name);
    put_string(buffer, value);
}

static void put_frame_header(struct buffer *buffer, size_t length, unsigned char type,
                             unsigned char flags, uint32_t stream) {
    unsigned char header[9] = {
        (unsigned char)(length >> 16), (unsigned char)(length >> 8), (unsigned char)length,
        type, flags,
        (unsigned char)(stream >> 24), (unsigned char)(stream >> 16),
        (unsigned char)(stream >> 8), (unsigned char)stream,
    };
    put(buffer, header, sizeof header);
}

static int parse_address(const char *text, struct sockaddr_storage *address,
                         socklen_t *address_length) {
    char host[INET6_ADDRSTRLEN + 2];
    const char *colon = strrchr(text, ':');
    if (colon == NULL || colon == text || (size_t)(colon - text) >= sizeof host) return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || port <= 0 || port > 65535) return -1;
    memset(address, 0, sizeof *address);
    size_t host_length = strlen(host);
    if (host[0] == '[' && host_length > 2 && host[host_length - 1] == ']') {
        host[host_length - 1] = '\0';
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)address;
        if (inet_pton(AF_INET6, host + 1, &v6->sin6_addr) != 1) return -1;
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        *address_length = sizeof *v6;
        return 0;
    }
    struct sockaddr_in *v4 = (struct sockaddr_in *)address;
    if (inet_pton(AF_INET, host, &v4->sin_addr) != 1) return -1;
    v4->sin_family = AF_INET;
    v4->sin_port = htons((uint16_t)port);
    *address_length = sizeof *v4;
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: grpc-health-check [-t SECONDS] ADDRESS:PORT [SERVICE]\n"
                    "  ADDRESS is an IP literal (127.0.0.1, [::1]); exit 0 when SERVING\n");
    exit(2);
}

int main(int argc, char **argv) {
    unsigned int timeout_seconds = 3;
    int argi = 1;
    if (argi < argc && strcmp(argv[argi], "-t") == 0) {
        if (argi + 1 >= argc) usage();
        char *end;
        long seconds = strtol(argv[argi + 1], &end, 10);
        if (*end != '\0' || seconds <= 0 || seconds > 3600) usage();
        timeout_seconds = (unsigned int)seconds;
        argi += 2;
    }
    if (argc - argi < 1 || argc - argi > 2) usage();
    target = argv[argi];
    const char *service = argc - argi == 2 ? argv[argi + 1] : "";

    struct sockaddr_storage address;
    socklen_t address_length;
    if (parse_address(target, &address, &address_length) != 0) usage();

    signal(SIGALRM, on_alarm);
    alarm(timeout_seconds);

    int fd = socket(address.ss_family, SOCK_STREAM, 0);
    if (fd < 0) fail(2, "socket");
    if (connect(fd, (struct sockaddr *)&address, address_length) != 0) fail(2, "connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    /* The request: preface, empty SETTINGS, HEADERS and DATA of stream 1. */
    struct buffer block = {.length = 0};
    put_byte(&block, 0x83); /* :method POST (static index 3) */
    put_byte(&block, 0x86); /* :scheme http (static index 6) */
    put_header(&block, 4, NULL, "/grpc.health.v1.Health/Check");
    put_header(&block, 1, NULL, target); /* :authority */
    put_header(&block, 31, NULL, "application/grpc");
    put_header(&block, 0, "te", "trailers");
    put_header(&block, 58, NULL, "grpc-health-check"); /* user-agent */

    struct buffer message = {.length = 0};
    size_t service_length = strlen(service);
    if (service_length > 200) usage();
    /* HealthCheckRequest { string service = 1; } after gRPC's 5-byte length prefix. */
    size_t body_length = service_length == 0 ? 0 : 2 + service_length;
    unsigned char prefix[5] = {0, 0, 0, 0, (unsigned char)body_length};
    put(&message, prefix, sizeof prefix);
    if (service_length > 0) {
        put_byte(&message, 0x0a);
        put_byte(&message, (unsigned char)service_length);
        put(&message, service, service_length);
    }

    struct buffer request = {.length = 0};
    put(&request, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24);
    put_frame_header(&request, 0, FRAME_SETTINGS, 0, 0);
    put_frame_header(&request, block.length, FRAME_HEADERS, FLAG_END_HEADERS, 1);
    put(&request, block.bytes, block.length);
    put_frame_header(&request, message.length, FRAME_DATA, FLAG_END_STREAM, 1);
    put(&request, message.bytes, message.length);
    send_all(fd, request.bytes, request.length);

    /* The reply: frames until stream 1 ends; its DATA is gathered. */
    unsigned char data[512];
    size_t data_length = 0;
    int first = 1;
    for (;;) {
        unsigned char header[9];
        receive_all(fd, header, sizeof header);
        size_t length = (size_t)header[0] << 16 | (size_t)header[1] << 8 | header[2];
        unsigned char type = header[3];
        unsigned char flags = header[4];
        uint32_t stream = ((uint32_t)header[5] << 24 | (uint32_t)header[6] << 16 |
                           (uint32_t)header[7] << 8 | header[8]) & 0x7fffffffu;
        /* A server's preface is a SETTINGS frame (RFC 9113 3.4). */
        if ((first && (type != FRAME_SETTINGS || stream != 0)) || length > 1 << 20) {
            errno = 0;
            fail(2, "does not speak HTTP/2 in plaintext (is it a gRPC port? TLS?)");
        }
        first = 0;
        unsigned char *payload = malloc(length + 1);
        if (payload == NULL) fail(2, "malloc");
        receive_all(fd, payload, length);
        errno = 0;
        if (type == FRAME_SETTINGS && !(flags & FLAG_ACK)) {
            struct buffer ack = {.length = 0};
            put_frame_header(&ack, 0, FRAME_SETTINGS, FLAG_ACK, 0);
            send_all(fd, ack.bytes, ack.length);
        } else if (type == FRAME_PING && !(flags & FLAG_ACK) && length == 8) {
            struct buffer pong = {.length = 0};
            put_frame_header(&pong, 8, FRAME_PING, FLAG_ACK, 0);
            put(&pong, payload, 8);
            send_all(fd, pong.bytes, pong.length);
        } else if (type == FRAME_GOAWAY) {
            fail(1, "closed the connection (GOAWAY) before answering");
        } else if (stream == 1 && type == FRAME_RST_STREAM) {
            fail(1, "reset the call (RST_STREAM)");
        } else if (stream == 1 && type == FRAME_DATA) {
            size_t start = 0, end = length;
            if (flags & FLAG_PADDED) {
                if (length == 0 || payload[0] >= length) fail(2, "sent a malformed DATA frame");
                start = 1;
                end = length - payload[0];
            }
            if (data_length + (end - start) > sizeof data) fail(2, "answered too much");
            memcpy(data + data_length, payload + start, end - start);
            data_length += end - start;
        }
        free(payload);
        if (stream == 1 && (type == FRAME_DATA || type == FRAME_HEADERS) &&
            (flags & FLAG_END_STREAM)) {
            break;
        }
    }
    close(fd);

    /* HealthCheckResponse { ServingStatus status = 1; } after the 5-byte prefix; proto3 leaves
     * out a status of 0 (UNKNOWN). No message at all: the call failed (its grpc-status is in
     * the trailers, which are not decoded here), e.g. NOT_FOUND for an unknown service. */
    errno = 0;
    if (data_length < 5) {
        fprintf(stderr, "grpc-health-check: %s answered no health status (an unknown service "
                        "\"%s\", or an error)\n", target, service);
        return 1;
    }
    if (data[0] == 1) fail(1, "answered a compressed message");
    if (data[0] != 0) fail(1, "answered something other than a gRPC message (not a gRPC port?)");
    size_t message_length = (size_t)data[1] << 24 | (size_t)data[2] << 16 |
                            (size_t)data[3] << 8 | data[4];
    if (message_length > data_length - 5) fail(2, "answered a truncated message");
    unsigned long status = 0;
    for (size_t i = 5; i < 5 + message_length;) {
        unsigned char tag = data[i++];
        if (tag != 0x08) fail(2, "answered a message this check does not read");
        status = 0;
        int shift = 0;
        while (i < 5 + message_length) {
            unsigned char byte = data[i++];
            status |= (unsigned long)(byte & 0x7f) << shift;
            shift += 7;
            if (!(byte & 0x80)) break;
            if (shift > 28) fail(2, "answered a malformed status");
        }
    }
    static const char *const names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
    const char *name = status < 4 ? names[status] : "an unknown status";
    printf("%s%s%s: %s\n", target, service_length ? " " : "", service, name);
    return status == 1 ? 0 : 1;
}
