#!/usr/bin/env python3
"""Runs a real ClickHouse 26.9 server from the chdb-core wheel.

chdb embeds clickhouse-local; clickhouse-local can open ClickHouse's own HTTP
and native listeners with SYSTEM START LISTEN. This launcher:
  1. changes into this folder so clickhouse-local reads config.xml/users.xml,
  2. blocks SIGTERM/SIGINT in the main thread (the engine must not be torn
     down mid-query by a signal landing in its threads),
  3. makes ONE call of chdb's low-level query(): open the listeners, then run
     a keepalive SELECT that never ends,
  4. a helper thread polls /ping, writes the ready file, and on SIGTERM/SIGINT
     kills the keepalive query so the call returns and the process exits.

Usage: launcher.py DATA_DIR READY_FILE
"""
import os
import signal
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
# The keepalive query is found again by its text (clickhouse-local has no
# query_id setting); the KILL statement itself starts with KILL, so it never
# matches itself.
KEEPALIVE_SQL = "SELECT sleepEachRow(1) FROM system.numbers SETTINGS max_execution_time = 0, max_block_size = 1"


def http(sql_or_path, data=None, timeout=2.0):
    url = "http://127.0.0.1:8123/" + sql_or_path
    req = urllib.request.Request(url, data=data)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode()


def supervisor(ready_file):
    # Wait for the listener, then announce readiness.
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if http("ping").strip() == "Ok.":
                version = http("?query=SELECT%20version()").strip()
                with open(ready_file, "w") as f:
                    f.write(version + "\n")
                print(f"clickhouse {version} ready on 127.0.0.1:8123 (http), :9000 (native)", flush=True)
                break
        except Exception:
            time.sleep(0.1)
    else:
        print("clickhouse did not answer /ping within 120 s", flush=True)
        os._exit(1)

    sig = signal.sigwait({signal.SIGTERM, signal.SIGINT})
    print(f"clickhouse: signal {sig}, stopping", flush=True)
    try:
        os.remove(ready_file)
    except FileNotFoundError:
        pass
    # Ending the keepalive query makes the main thread's query() return.
    for _ in range(50):
        try:
            http("", data=b"KILL QUERY WHERE startsWith(query, 'SELECT sleepEachRow(1)') SYNC")
            return
        except Exception:
            time.sleep(0.1)
    os._exit(0)


def main():
    data_dir = os.path.abspath(sys.argv[1])
    ready_file = os.path.abspath(sys.argv[2])
    os.makedirs(data_dir, exist_ok=True)
    os.chdir(HERE)
    # Blocked here, inherited by every thread started afterwards (including the
    # engine's); the supervisor receives them with sigwait.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    threading.Thread(target=supervisor, args=(ready_file,), daemon=True).start()

    from chdb import _chdb  # imported after the mask so engine threads inherit it

    sql = "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; " + KEEPALIVE_SQL
    try:
        _chdb.query(sql, "TabSeparated", path=data_dir)
    except Exception as e:  # the KILL surfaces as an exception: a clean stop
        print(f"clickhouse: keepalive ended ({type(e).__name__})", flush=True)
    print("clickhouse: stopped", flush=True)


if __name__ == "__main__":
    main()
