"""Talk to the site's SPARQL gateway as an algorithm (honest or not) would, and report what happened.

The input is a JSON object {"steps": [{"name": ..., "do": ..., ...}, ...]}; the steps run in order,
and /output/report.json ({"environment": {...}, "steps": {name: what happened}}) is rewritten after
each one, so a run that is stopped midway still tells how far it got. What a step may "do":

  http          one request with urllib: "method", "path" (instead of the endpoint's), "params" (query
                string), "form" (urlencoded body), "body" + "content_type", "accept", "headers", "timeout"
  sparqlwrapper one query with SPARQLWrapper: "query", "format" (json, turtle, xml), "method" (GET, POST),
                "request_method" (urlencoded, postdirectly)
  tcp           connect to each of "addresses" ("host:port", "[::1]:port"), send nothing
  net           interfaces, routes and listening sockets of this network namespace
  raw           open a connection to the gateway and send bytes: "send" (text, latin-1), "random_bytes"
                (N bytes from a fixed seed) or "big_header" (N bytes of one header line); read the reply
  slowloris     open "connections" connections to the gateway that send nothing, run the step "during"
                meanwhile, hold them "hold_seconds", then close them
  parallel      run "step" in "threads" threads at once (all released together); a list of what each saw
  loop          query ("query") every "interval" seconds, and try each of "reach", until "stop_file"
                exists or "seconds" passed; each attempt is appended to "progress_file" as a JSON line
  netns         which network namespace this is (the link /proc/self/ns/net)
  linger        leave a process behind that listens on 127.0.0.1:"port" and on the abstract Unix socket
                "unix_name", detached from this one (its own session), for a later run in the namespace to find

The gateway is the host and port of $SPARQL_ENDPOINT. Nothing here has a fixed address of its own.
"""

import base64
import datetime
import http.client
import json
import os
import random
import re
import socket
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

INPUT = os.environ.get("PROBE_INPUT", "/input/input.txt")
OUTPUT = os.environ.get("PROBE_OUTPUT", "/output")
ENDPOINT = os.environ.get("SPARQL_ENDPOINT", "")
KEPT = 4000  # characters of a body kept in the report
JSON_KEPT = 200_000  # bodies up to this size are parsed as JSON when they say they are JSON

# Never a proxy, whatever the environment says.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def describe(error):
    return f"{type(error).__name__}: {error}"


def gateway():
    parts = urllib.parse.urlsplit(ENDPOINT)
    return parts.hostname, parts.port or 80


def endpoint_url(step):
    url = step.get("url") or ENDPOINT
    if "path" in step:
        url = urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=step["path"], query=""))
    if step.get("params") is not None:
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode(step["params"])
    return url


def do_http(step):
    data, headers = None, {}
    if "form" in step:
        data = urllib.parse.urlencode(step["form"]).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if "body" in step:
        data = step["body"].encode()
    if "content_type" in step:
        headers["Content-Type"] = step["content_type"]
    if "accept" in step:
        headers["Accept"] = step["accept"]
    headers.update(step.get("headers", {}))
    method = step.get("method", "POST" if data is not None else "GET")
    request = urllib.request.Request(endpoint_url(step), data=data, headers=headers, method=method)
    result = {"at": now(), "status": None, "reason": None, "error": None}
    started = time.monotonic()
    try:
        response = opener.open(request, timeout=step.get("timeout", 15))
    except urllib.error.HTTPError as error:
        response = error
    except Exception as error:  # refused, reset, timed out: all "no answer"
        result["error"] = describe(error)
        result["seconds"] = time.monotonic() - started
        return result
    result["status"] = response.getcode()
    result["reason"] = response.reason
    result["content_type"] = response.headers.get("Content-Type")
    body = b""
    try:
        body = response.read()
    except http.client.IncompleteRead as error:
        body = error.partial
        result["error"] = describe(error)
    except Exception as error:
        result["error"] = describe(error)
    finally:
        response.close()
    result["seconds"] = time.monotonic() - started
    result["bytes"] = len(body)
    result["body"] = body[:KEPT].decode("utf-8", "replace")
    result["lines"] = sum(1 for line in body.splitlines() if line.strip())
    if result["error"] is None and "json" in (result["content_type"] or "") and len(body) <= JSON_KEPT:
        try:
            result["json"] = json.loads(body)
        except ValueError as error:
            result["json_error"] = describe(error)
    return result


def do_sparqlwrapper(step):
    import SPARQLWrapper as sw

    wrapper = sw.SPARQLWrapper(step.get("url") or ENDPOINT)
    wrapper.setQuery(step["query"])
    wrapper.setReturnFormat({"json": sw.JSON, "turtle": sw.TURTLE, "xml": sw.XML}[step.get("format", "json")])
    wrapper.setMethod(sw.POST if step.get("method") == "POST" else sw.GET)
    if step.get("request_method") == "postdirectly":
        wrapper.setRequestMethod(sw.POSTDIRECTLY)
    wrapper.setTimeout(step.get("timeout", 15))
    result = {"at": now(), "error": None}
    try:
        answer = wrapper.query().convert()
    except urllib.error.HTTPError as error:
        result["error"] = describe(error)
        result["status"], result["reason"] = error.code, error.reason
        result["body"] = error.read()[:KEPT].decode("utf-8", "replace")
        return result
    except Exception as error:  # SPARQLWrapper's own exceptions, IncompleteRead, JSON errors, ...
        result["error"] = describe(error)
        return result
    if isinstance(answer, (bytes, str)):
        text = answer if isinstance(answer, str) else answer.decode("utf-8", "replace")
        result["bytes"] = len(answer)
        result["lines"] = sum(1 for line in text.splitlines() if line.strip())
    elif isinstance(answer, dict):
        result["json"] = answer
    else:
        result["answer_type"] = type(answer).__name__
    return result


def connect(address, timeout):
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect((host, int(port)))
        return "connected"
    except OSError as error:
        return f"failed: {describe(error)}"


def do_tcp(step):
    return {address: connect(address, step.get("timeout", 3)) for address in step["addresses"]}


def listening():
    """The TCP sockets listening in this network namespace, as "address:port"."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            text = socket.inet_ntop(family, raw)
            found.append(f"[{text}]:{int(port, 16)}" if family == socket.AF_INET6 else f"{text}:{int(port, 16)}")
    return sorted(found)


def abstract_unix_sockets():
    """The abstract Unix socket names bound in this network namespace."""
    names = []
    for line in open("/proc/net/unix").read().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[7].startswith("@"):
            names.append(fields[7][1:])
    return sorted(names)


def do_net(_step):
    try:
        ipv6_devices = sorted({line.split()[-1] for line in open("/proc/net/ipv6_route") if line.strip()})
    except OSError as error:
        ipv6_devices = f"unreadable: {describe(error)}"
    return {
        "interfaces": [name for _index, name in socket.if_nameindex()],
        "route": open("/proc/net/route").read().splitlines(),
        "ipv6_route_devices": ipv6_devices,
        "listening": listening(),
        "abstract_unix": abstract_unix_sockets(),
    }


def do_netns(_step):
    return os.readlink("/proc/self/ns/net")


def do_linger(step):
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", step["port"]))
    tcp.listen(8)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind("\0" + step["unix_name"])
    unix.listen(8)
    child = os.fork()
    if child == 0:  # its child leaves this session and would outlive this process, holding both sockets
        os.setsid()
        if os.fork() == 0:
            while True:
                time.sleep(3600)
        os._exit(0)
    os.waitpid(child, 0)
    tcp.close()
    unix.close()
    return {"listening": listening(), "abstract_unix": abstract_unix_sockets()}


def do_raw(step):
    if "big_header" in step:
        path = urllib.parse.urlsplit(ENDPOINT).path or "/"
        data = (f"GET {path}?query=ASK%7B%7D HTTP/1.1\r\nHost: {gateway()[0]}\r\nX-Padding: ".encode()
                + b"a" * step["big_header"] + b"\r\n\r\n")
    elif "random_bytes" in step:
        data = random.Random(step.get("seed", 7)).randbytes(step["random_bytes"])
    else:
        data = step["send"].encode("latin-1")
    result = {"at": now(), "sent": 0, "send_error": None, "read_error": None}
    started = time.monotonic()
    try:
        connection = socket.create_connection(gateway(), timeout=step.get("timeout", 10))
    except OSError as error:
        result["connect_error"] = describe(error)
        return result
    with connection:
        try:
            connection.sendall(data)
            result["sent"] = len(data)
            if step.get("half_close", True):
                connection.shutdown(socket.SHUT_WR)
        except OSError as error:
            result["send_error"] = describe(error)
        reply = b""
        try:
            while len(reply) < 65536:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except OSError as error:
            result["read_error"] = describe(error)
    result["seconds"] = time.monotonic() - started
    result["reply_bytes"] = len(reply)
    result["reply_first_line"] = reply.split(b"\r\n", 1)[0][:300].decode("latin-1")
    # Every response in the reply (several, if the gateway answered pipelined requests).
    result["reply_status_lines"] = [line.decode("latin-1")
                                    for line in re.findall(rb"HTTP/1\.[01] \d{3}[^\r\n]*", reply)]
    return result


def do_slowloris(step):
    connections, errors = [], []
    for _ in range(step["connections"]):
        try:
            connections.append(socket.create_connection(gateway(), timeout=5))
        except OSError as error:
            errors.append(describe(error))
    result = {"opened": len(connections), "open_errors": errors[:5]}
    if "during" in step:
        result["during"] = run_step(step["during"])
    time.sleep(step.get("hold_seconds", 3))
    closed = 0
    for connection in connections:
        connection.setblocking(False)
        try:
            if connection.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        connection.close()
    result["closed_by_the_other_end"] = closed
    return result


def do_parallel(step):
    results = [None] * step["threads"]
    start = threading.Barrier(step["threads"])

    def one(index):
        start.wait()
        results[index] = run_step(step["step"])

    threads = [threading.Thread(target=one, args=(index,)) for index in range(step["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def do_loop(step):
    deadline = time.monotonic() + step["seconds"]
    summary = {"answered": 0, "failed": 0, "reached": [], "stopped_by_file": False}
    with open(step["progress_file"], "a") as progress:
        while time.monotonic() < deadline:
            if os.path.exists(step["stop_file"]):
                summary["stopped_by_file"] = True
                break
            attempt = do_http({"params": {"query": step["query"]},
                               "accept": "application/sparql-results+json", "timeout": 3})
            answered = attempt["status"] == 200 and attempt["error"] is None and "json" in attempt
            reach = {address: connect(address, 1) for address in step.get("reach", [])}
            line = {"at": attempt["at"], "answered": answered,
                    "outcome": "answered" if answered else (attempt["error"] or f"HTTP {attempt['status']}"),
                    "answer": attempt.get("json"), "reach": reach}
            summary["answered" if answered else "failed"] += 1
            summary["reached"] += [address for address, what in reach.items() if what == "connected"]
            progress.write(json.dumps(line) + "\n")
            progress.flush()
            time.sleep(step.get("interval", 0.3))
    return summary


STEPS = {"http": do_http, "sparqlwrapper": do_sparqlwrapper, "tcp": do_tcp, "net": do_net, "raw": do_raw,
         "slowloris": do_slowloris, "parallel": do_parallel, "loop": do_loop,
         "netns": do_netns, "linger": do_linger}


def run_step(step):
    try:
        return STEPS[step["do"]](step)
    except Exception:  # a step the probe did not foresee failing: report it, go on with the next
        return {"probe_error": traceback.format_exc()}


def main():
    task = json.load(open(INPUT))
    report = {"environment": {name: os.environ.get(name) for name in ("SPARQL_ENDPOINT", "endpointUrl")},
              "steps": {}}
    for step in task.get("steps", []):
        report["steps"][step["name"]] = run_step(step)
        print(f"sparql-probe: {step['name']}: {json.dumps(report['steps'][step['name']])[:300]}", flush=True)
        with open(os.path.join(OUTPUT, "report.json.new"), "w") as out:
            json.dump(report, out)
        os.replace(os.path.join(OUTPUT, "report.json.new"), os.path.join(OUTPUT, "report.json"))


if __name__ == "__main__":
    main()
