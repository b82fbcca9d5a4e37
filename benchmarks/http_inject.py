"""HTTP inject against the bare floor: ``POST /api/v1/inject`` of the product and of an empty
Starlette endpoint, in the same run, taking turns.

    python benchmarks/http_inject.py [--rounds 3] [--seconds 10] [--connections 32]
                                     [--loop asyncio|uvloop] [--before DIR]

Both servers run in child processes on uvicorn (uvloop, httptools); the load comes from
``wrk`` (the Debian package: ``apt-get install wrk``), one thread, keep-alive connections.

- **bare**: a Starlette route that reads the body and answers 202 with a small JSON object
  (``benchmarks/soak.py``'s RAW BASELINE).
- **product**: ``xml-pipeline run`` with a token set (``XML_PIPELINE_API_TOKEN``), one listener
  whose handler returns at once, ``fsync: batch``; each request is the JSON form of inject
  (``{"to": "sink", "payload": "<Item>...</Item>"}``) with the bearer token: parse, both XSD
  validations, the group-committed append, the 202.

Each round runs bare then product for ``--seconds`` each; it prints requests per second, the
latency percentiles wrk reports and every answer that was not 2xx, then the median ratio
product/bare. With ``--before DIR`` (a folder holding another version's ``xml_pipeline``
package, say ``git archive REV xml_pipeline | tar -x -C DIR``), each round also runs that
version (``before``) between the two, so that a change is measured against the code it
changes in the same run. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import Server, free_port, spawn  # noqa: E402
from soak import BASELINE_APP  # noqa: E402

ORGANISM = """\
organism:
  name: http-bench
  log: {path: events, fsync: batch}
listeners:
  - name: sink
    description: Takes an item and does nothing with it.
    payload: schemas/item.xsd
    handler: "bench_handlers:sink"
"""

ITEM_XSD = """\
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Item"><xs:complexType><xs:sequence>
    <xs:element name="n" type="xs:string"/>
  </xs:sequence></xs:complexType></xs:element>
</xs:schema>
"""

HANDLERS = """\
async def sink(payload, ctx):
    return None
"""

BODY = '{"to": "sink", "payload": "<Item><n>42</n></Item>"}'

SCRIPT = """\
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
%s
"""


def write_organism(folder: Path) -> Path:
    (folder / "schemas").mkdir(parents=True, exist_ok=True)
    (folder / "schemas" / "item.xsd").write_text(ITEM_XSD)
    (folder / "bench_handlers.py").write_text(HANDLERS)
    path = folder / "organism.yaml"
    path.write_text(ORGANISM)
    return path


def wrk_script(folder: Path, name: str, token: str | None) -> Path:
    header = f'wrk.headers["Authorization"] = "Bearer {token}"' if token else ""
    path = folder / f"{name}.lua"
    path.write_text(textwrap.dedent(SCRIPT % (BODY, header)))
    return path


async def load(url: str, script: Path, seconds: float, connections: int) -> dict[str, str]:
    """Run wrk; its figures: requests/s, latency percentiles, non-2xx answers, errors."""
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
        url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await process.communicate())[0].decode()
    found = {"rps": re.search(r"Requests/sec:\s+([\d.]+)", out),
             "p50": re.search(r"\s50%\s+(\S+)", out), "p99": re.search(r"\s99%\s+(\S+)", out),
             "non2xx": re.search(r"Non-2xx or 3xx responses: (\d+)", out),
             "errors": re.search(r"Socket errors: (.*)", out)}
    if found["rps"] is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    return {key: (match.group(1) if match else "0") for key, match in found.items()}


def line(name: str, figures: dict[str, str]) -> str:
    extra = "" if figures["non2xx"] == "0" else f"  non-2xx {figures['non2xx']}"
    extra += "" if figures["errors"] == "0" else f"  socket errors: {figures['errors']}"
    return (f"  {name:<8} {float(figures['rps']):>9,.0f} req/s  p50 {figures['p50']:>8}  "
            f"p99 {figures['p99']:>8}{extra}")


async def start(name: str, folder: Path, organism: Path, args: argparse.Namespace
                ) -> tuple[Server, int]:
    """Start ``name`` (bare, before or product) on a free port; the server and the port."""
    port = free_port()
    if name == "bare":
        return await spawn(["-c", BASELINE_APP, str(port)], cwd=folder), port
    shutil.rmtree(folder / "events", ignore_errors=True)
    command = ["-m", "xml_pipeline", "run", str(organism), "--port", str(port),
               "--no-access-log", "--loop", args.loop]
    if name == "before":
        # The older package comes first on the path, ahead of the installed one.
        command = ["-c", f"import sys, runpy; sys.path.insert(0, {str(args.before)!r}); "
                   "sys.argv[1:] = " + repr(command[2:]) + "; "
                   "runpy.run_module('xml_pipeline', run_name='__main__')"]
    return await spawn(command, cwd=folder), port


async def bench(folder: Path, args: argparse.Namespace) -> None:
    token = secrets.token_urlsafe(24)
    os.environ["XML_PIPELINE_API_TOKEN"] = token  # inherited by the product's process
    organism = write_organism(folder)
    bare_script = wrk_script(folder, "bare", None)
    product_script = wrk_script(folder, "product", token)
    names = ("bare", "before", "product") if args.before else ("bare", "product")
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    print(f"HTTP inject: {args.connections} connections, {args.seconds:g} s per run, "
          f"{args.rounds} rounds, wrk -t1, product on {args.loop}, "
          f"python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cpus")
    for round_number in range(1, args.rounds + 1):
        print(f"round {round_number}")
        figures = {}
        for name in names:
            server, port = await start(name, folder, organism, args)
            drain = asyncio.ensure_future(server.drain())
            try:
                script = bare_script if name == "bare" else product_script
                figures[name] = await load(f"http://127.0.0.1:{port}/api/v1/inject",
                                           script, args.seconds, args.connections)
            finally:
                server.kill()
                await server.process.wait()
                await drain
            print(line(name, figures[name]))
        for name, found in ratios.items():
            found.append(float(figures[name]["rps"]) / float(figures["bare"]["rps"]))
            print(f"  {name}/bare = {found[-1]:.2f}x")
    for name, found in ratios.items():
        print(f"median {name}/bare over {args.rounds} rounds: {statistics.median(found):.2f}x "
              f"(rounds: {', '.join(f'{r:.2f}' for r in found)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="the product's event loop (xml-pipeline run --loop)")
    parser.add_argument("--before", type=Path,
                        help="a folder with another version's xml_pipeline package, run too")
    parser.add_argument("--dir", help="where the organism and its log go (default: a temp dir)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    if args.dir:
        asyncio.run(bench(Path(args.dir), args))
        return
    with tempfile.TemporaryDirectory(prefix="xp-bench-http-") as folder:
        asyncio.run(bench(Path(folder), args))


if __name__ == "__main__":
    main()
