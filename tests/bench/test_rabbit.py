"""The bench's RabbitMQ: a real broker on free loopback ports, driven with pika."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pika
import psutil
import pytest

from tilehopper_bench import procs
from tilehopper_bench.rabbit import SERVER, RabbitMQ, queue_counts

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(not SERVER.exists(), reason="rabbitmq-server is not installed"),
]


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(procs.free_port())
    return sorted(ports)


def _rabbit(workdir: Path) -> RabbitMQ:
    amqp, mgmt, epmd = _free_ports(3)
    return RabbitMQ(workdir, amqp_port=amqp, mgmt_port=mgmt, epmd_port=epmd)


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    broker = _rabbit(tmp_path_factory.mktemp("rabbit"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def channel(rabbit: RabbitMQ, request: pytest.FixtureRequest) -> Iterator[tuple[str, object]]:
    conn = pika.BlockingConnection(pika.URLParameters(rabbit.amqp_url))
    ch = conn.channel()
    queue = f"test.{request.node.name}"
    ch.queue_declare(queue, durable=True)
    ch.confirm_delivery()
    try:
        yield queue, ch
    finally:
        ch.queue_delete(queue)
        conn.close()


def _publish(ch: pika.adapters.blocking_connection.BlockingChannel, queue: str, body: bytes) -> None:
    # With confirm_delivery() on, basic_publish returns only once the broker has confirmed;
    # mandatory=True makes an unroutable message raise instead of vanishing.
    ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)


def test_env_names_loopback_urls(rabbit: RabbitMQ) -> None:
    assert rabbit.env == {
        "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{rabbit.amqp_port}/%2F",
        "RABBITMQ_API_URL": f"http://guest:guest@127.0.0.1:{rabbit.mgmt_port}",
    }


def test_every_listener_is_on_loopback(rabbit: RabbitMQ) -> None:
    beam = int(rabbit.pid_file.read_text())
    ports = {}
    for pid in (beam, rabbit._epmd.pid):  # type: ignore[union-attr]
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                ports[conn.laddr.port] = conn.laddr.ip
    assert {rabbit.amqp_port, rabbit.mgmt_port, rabbit.dist_port, rabbit.epmd_port} <= set(ports)
    assert all(ip in ("127.0.0.1", "::1") for ip in ports.values()), ports


def test_publish_confirmed_then_consume(channel: tuple[str, object]) -> None:
    queue, ch = channel
    _publish(ch, queue, b'{"x":1,"y":2,"zoom":3}')  # type: ignore[arg-type]
    method, _props, body = ch.basic_get(queue)  # type: ignore[attr-defined]
    assert body == b'{"x":1,"y":2,"zoom":3}'
    assert not method.redelivered
    ch.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
    assert ch.basic_get(queue) == (None, None, None)  # type: ignore[attr-defined]


def test_publish_to_a_missing_queue_is_refused(channel: tuple[str, object]) -> None:
    _queue, ch = channel
    with pytest.raises(pika.exceptions.UnroutableError):
        _publish(ch, "test.no-such-queue", b"{}")  # type: ignore[arg-type]


def test_nack_requeue_brings_the_message_back_redelivered(channel: tuple[str, object]) -> None:
    queue, ch = channel
    _publish(ch, queue, b"tile")  # type: ignore[arg-type]
    first, _props, _body = ch.basic_get(queue)  # type: ignore[attr-defined]
    ch.basic_nack(first.delivery_tag, requeue=True)  # type: ignore[attr-defined]
    again, _props, body = ch.basic_get(queue)  # type: ignore[attr-defined]
    assert body == b"tile"
    assert again.redelivered
    ch.basic_ack(again.delivery_tag)  # type: ignore[attr-defined]


def test_queue_counts_see_ready_and_unacked_at_once(
    rabbit: RabbitMQ, channel: tuple[str, object]
) -> None:
    queue, ch = channel
    for i in range(3):
        _publish(ch, queue, b"%d" % i)  # type: ignore[arg-type]
    assert queue_counts(rabbit.api_url, queue) == (3, 0, 3)
    method, _props, _body = ch.basic_get(queue)  # type: ignore[attr-defined]
    assert queue_counts(rabbit.api_url, queue) == (2, 1, 3)
    ch.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
    assert queue_counts(rabbit.api_url, queue) == (2, 0, 2)


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    broker = _rabbit(tmp_path)
    broker.start()
    try:
        beam = int(broker.pid_file.read_text())
        ours = [beam, broker._epmd.pid, broker._server.pid]  # type: ignore[union-attr]
    finally:
        broker.stop()
    assert [pid for pid in ours if psutil.pid_exists(pid)] == []
    assert not procs.port_open("127.0.0.1", broker.amqp_port)
    assert not os.path.exists(broker.pid_file)


def test_queue_counts_of_a_missing_queue_is_an_error(rabbit: RabbitMQ) -> None:
    with pytest.raises(LookupError):
        queue_counts(rabbit.api_url, "test.no-such-queue")
