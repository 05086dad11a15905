"""Produce throughput of confluent-kafka (librdkafka) through the broker's
Kafka listener: COUNT records of RECORD_BYTES (the same values sluice-bench
sends with --payload fill: 8 zero bytes, then 0x5a), keyless, to a fresh
topic of PARTITIONS partitions created over Kafka (CreateTopics). acks=all,
linger.ms=5, batch.size 1 MiB, idempotent (as the Rust client's producer
is by default). Timed from the first send to the last acknowledgement.
Prints one JSON object, with the CPU seconds this process (Python and
librdkafka's threads) and the broker (SERVER_PID) used in that time.
benches/kafka_throughput.sh runs it.

    kafka_throughput.py BOOTSTRAP TOPIC PARTITIONS COUNT RECORD_BYTES SERVER_PID
"""

import json
import os
import sys
import time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic


def cpu_seconds(pid):
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(bootstrap, topic, partitions, count, record_bytes, server_pid):
    partitions, count, record_bytes = int(partitions), int(count), int(record_bytes)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(30)
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "batch.size": 1 << 20,
        "message.max.bytes": 2 << 20,
        "queue.buffering.max.kbytes": 256 * 1024,
        "queue.buffering.max.messages": 1_000_000,
        "compression.type": "none",
    })
    value = bytes(8) + b"\x5a" * (record_bytes - 8)
    state = {"acked": 0, "errors": 0, "first_error": None}

    def on_delivery(err, _msg):
        if err is None:
            state["acked"] += 1
        else:
            state["errors"] += 1
            state["first_error"] = state["first_error"] or str(err)

    # Let the producer learn the topic's metadata before the clock starts.
    producer.list_topics(topic, timeout=10)
    start = time.perf_counter()
    client_cpu, server_cpu = time.process_time(), cpu_seconds(server_pid)
    for _ in range(count):
        while True:
            try:
                producer.produce(topic, value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    left = producer.flush(300)
    seconds = time.perf_counter() - start
    client_cpu, server_cpu = time.process_time() - client_cpu, cpu_seconds(server_pid) - server_cpu
    if left or state["errors"] or state["acked"] != count:
        sys.exit(f"{state['acked']} of {count} acknowledged, {state['errors']} failed "
                 f"({state['first_error']}), {left} left")
    print(json.dumps({
        "label": "confluent-kafka (Kafka listener)",
        "records": count,
        "record_bytes": record_bytes,
        "partitions": partitions,
        "seconds": seconds,
        "records_per_sec": count / seconds,
        "mb_per_sec": count * record_bytes / seconds / 1e6,
        "client_cpu_s": client_cpu,
        "server_cpu_s": server_cpu,
    }))


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    main(*sys.argv[1:])
