"""moto's server (S3 and SQS on one port) in a process of its own, printing its URL.

Its SQS ReceiveMessage works out every attribute of the queue for each message it returns,
each attribute scanning all messages: with a few thousand messages waiting, moto would
take seconds a receive and measure itself. ``tests.support.moto.lean_sqs_receives`` makes
that one check read the one attribute it needs; what SQS answers is unchanged.

    python -m benchmarks.moto_server
"""

from __future__ import annotations

import logging
import signal
import threading

from moto.server import ThreadedMotoServer
from tests.support.moto import lean_sqs_receives


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    lean = lean_sqs_receives()
    next(lean)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"http://{host}:{port}", flush=True)
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
