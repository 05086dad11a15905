"""confluent-kafka (librdkafka) against the broker's Kafka listener
(client/tests/kafka_clients.rs runs it). Every command prints JSON on
stdout and exits non-zero with a message on stderr when something is off.

    produce BOOTSTRAP TOPIC COMPRESSION
        Records as JSON lines on stdin (kafka_records.py), batched
        (linger.ms 20) and compressed with COMPRESSION (none, gzip,
        snappy, lz4, zstd); {"sent": [{"partition", "offset",
        "timestamp_ms"}]} in input order once every one is acknowledged.
    produce-idempotent BOOTSTRAP TOPIC COUNT PER_SECOND
        An idempotent producer (enable.idempotence, acks=all) sends values
        "value-0".."value-<COUNT-1>" at PER_SECOND, retrying through broker
        restarts; one JSON line per delivery report ({"event": "acked",
        "value", "partition", "offset"} or {"event": "failed", "value",
        "error"}), {"event": "fatal"} for a fatal producer error, and
        {"event": "done", "acked", "failed", "unflushed"} at the end.
"""

import sys
import time

from confluent_kafka import Producer

from kafka_records import emit, fail, read_records, unb64, usage


def produce(bootstrap, topic, compression):
    records = read_records()
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "compression.type": compression,
        "linger.ms": 20,
        "acks": "all",
    })
    sent = [None] * len(records)
    errors = []

    def report(i):
        def on_delivery(err, msg):
            if err is not None:
                errors.append(f"record {i}: {err}")
            else:
                sent[i] = {"partition": msg.partition(), "offset": msg.offset(), "timestamp_ms": msg.timestamp()[1]}
        return on_delivery

    for i, r in enumerate(records):
        kwargs = {
            "key": unb64(r["key"]),
            "value": unb64(r["value"]),
            "headers": [(name, unb64(v)) for name, v in r["headers"]],
            "on_delivery": report(i),
        }
        if r.get("partition") is not None:
            kwargs["partition"] = r["partition"]
        if r.get("timestamp_ms") is not None:
            kwargs["timestamp"] = r["timestamp_ms"]
        producer.produce(topic, **kwargs)
        producer.poll(0)
    left = producer.flush(30)
    if errors or left:
        fail(f"{compression}: {left} record(s) unacknowledged after 30 s; errors: {errors}")
    emit({"sent": sent})


def produce_idempotent(bootstrap, topic, count, per_second):
    count, pause = int(count), 1 / float(per_second)
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 90000,
        "retry.backoff.ms": 100,
        "retry.backoff.max.ms": 1000,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 1000,
        "error_cb": lambda err: emit({"event": "fatal" if err.fatal() else "error", "error": str(err)}),
    })
    tally = {"acked": 0, "failed": 0}

    def on_delivery(err, msg):
        value = msg.value().decode()
        if err is not None:
            tally["failed"] += 1
            emit({"event": "failed", "value": value, "error": str(err)})
        else:
            tally["acked"] += 1
            emit({"event": "acked", "value": value, "partition": msg.partition(), "offset": msg.offset()})

    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=f"key-{i % 5}".encode(), value=f"value-{i}".encode(),
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        time.sleep(pause)
    left = producer.flush(120)
    emit({"event": "done", "acked": tally["acked"], "failed": tally["failed"], "unflushed": left})


COMMANDS = {
    "produce": (produce, 3),
    "produce-idempotent": (produce_idempotent, 4),
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS or len(sys.argv) - 2 != COMMANDS[sys.argv[1]][1]:
        usage(__doc__)
    COMMANDS[sys.argv[1]][0](*sys.argv[2:])
