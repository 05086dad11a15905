"""What the Kafka client scripts share: records as JSON, output, failure.

A record crosses between the Rust test and the scripts as one JSON object,
every byte string in base64 so binary keys, values and headers survive
byte for byte, and null kept apart from empty:

    {"key": b64 | null, "value": b64 | null,
     "headers": [[name, b64 | null], ...], "timestamp_ms": int,
     "partition": int, "offset": int}

(`partition` and `offset` where known; `timestamp_ms` may be absent on
records to produce: the client stamps them.)
"""

import base64
import json
import sys


def b64(data):
    return None if data is None else base64.b64encode(data).decode()


def unb64(text):
    return None if text is None else base64.b64decode(text)


def record_json(partition, offset, key, value, headers, timestamp_ms):
    return {
        "partition": partition,
        "offset": offset,
        "key": b64(key),
        "value": b64(value),
        "headers": [[name, b64(v)] for name, v in (headers or [])],
        "timestamp_ms": timestamp_ms,
    }


def read_records(stream=sys.stdin):
    """The records to produce: one JSON object per line."""
    return [json.loads(line) for line in stream if line.strip()]


def emit(obj):
    """One JSON line on stdout, at once (the test reads it as it comes)."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def fail(message):
    sys.stderr.write(f"{sys.argv[0]}: FAILED: {message}\n")
    sys.stderr.flush()
    sys.exit(1)


def usage(doc):
    sys.stderr.write(doc)
    sys.exit(2)
