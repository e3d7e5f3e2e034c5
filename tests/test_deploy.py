"""The deployment in deploy/ against real parts: Debian's promtool, Prometheus and HAProxy
started here on tiny servers, and the Kubernetes manifests read against the server's own CLI.

The Debian tools come from scripts/ensure_deploy_tools.sh (`make test` runs it as root); without
them a test skips here and fails under CI (CI=true), so a green CI always ran them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from medvl.http.validate import free_port, running_server, wait_ready

from conftest import REPO

DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
KUBERNETES = DEPLOY / "kubernetes"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (scripts/ensure_deploy_tools.sh installs it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_config_and_alert_rules_pass_promtool():
    promtool = need("promtool")
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                 ("test", "rules", "alerts_test.yml")):
        result = run(promtool, *args, cwd=PROMETHEUS)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def test_an_alert_test_that_should_fail_does(tmp_path):
    """The rule tests can fail: with the error-rate threshold raised above the tested 9%, the
    test that expects it to fire must fail."""
    promtool = need("promtool")
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    rules = (PROMETHEUS / "alerts.yml").read_text()
    assert " > 0.05" in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(" > 0.05", " > 0.5"))
    result = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "MedvlHighErrorRate" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def tiny_server(phases_1_4):
    with running_server(phases_1_4, extra_args=["--max-new-tokens", "16", "--set", "api.source_boxes=false"]) as base:
        r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "medvl", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 200, r.text  # so the histograms and counters have samples
        yield base


def test_metric_names_pass_promtool_check_metrics(tiny_server):
    promtool = need("promtool")
    text = httpx.get(f"{tiny_server}/metrics", timeout=10).text
    assert "medvl_engine_prefill_seconds_total" in text and "medvl_engine_dead" in text
    result = run(promtool, "check", "metrics", input=text)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_prometheus_scrapes_the_server_with_the_projects_config(tiny_server, tmp_path):
    """Debian's Prometheus, started with deploy/prometheus/prometheus.yml (its target pointed at
    the tiny server, its interval shortened), reads the medvl series back over its HTTP API,
    and loads the alert rules."""
    prometheus = need("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "medvl")
    job["static_configs"] = [{"targets": [tiny_server.removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path)
    port = free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        series: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not {"medvl_model_loaded", "medvl_requests_total"} <= series.keys():
            time.sleep(1)
            try:
                result = httpx.get(f"{api}/query", params={"query": '{__name__=~"medvl_.+", job="medvl"}'},
                                   timeout=5).json()
            except httpx.HTTPError:
                continue
            series = {s["metric"]["__name__"]: float(s["value"][1]) for s in result["data"]["result"]}
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert series.get("medvl_model_loaded") == 1.0, sorted(series)
        assert series.get("medvl_engine_dead") == 0.0
        assert series.get("medvl_num_requests_waiting_limit", 0) > 0
        assert "medvl_time_to_first_token_seconds_count" in series
        rules = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"MedvlEngineDead", "MedvlHighErrorRate",
                                                                  "MedvlQueueSaturated", "MedvlSlowFirstToken"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_grafana_dashboard_plots_series_the_server_exports(tiny_server):
    """Every medvl_ series a panel of deploy/grafana/dashboards/ queries is one /metrics serves."""
    import json

    exported = set(re.findall(r"^(medvl_\w+)", httpx.get(f"{tiny_server}/metrics", timeout=10).text, re.M))
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "medvl-serving.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"medvl_\w+", target["expr"])}
    assert queried and queried <= exported, queried - exported
    assert {"medvl_time_to_first_token_seconds_bucket", "medvl_inter_token_latency_seconds_bucket",
            "medvl_kv_cache_usage_perc", "medvl_engine_dead", "medvl_num_requests_waiting"} <= queried


def test_compose_runs_the_servers_own_commands_and_mounts_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name, module in (("api", "medvl.http.server"), ("demo", "medvl.http.demo_ui")):
        usage = help_text(module)
        flags = [a for a in services[name]["entrypoint"][1:] if a.startswith("--")]
        assert flags and all(re.search(rf"\s{re.escape(f)}\b", usage) for f in flags), (name, flags)
        env = [k for k in services[name].get("environment", {}) if k.startswith("MEDVL_")]
        assert all(k in usage for k in env), (name, env)
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["api:8000"]  # the compose service and its port


# --------------------------------------------------------------------------- HAProxy


def start_server(workdir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medvl.http.server", "--workdir", str(workdir), "--port", str(port),
                             "--max-new-tokens", "16", "--set", "api.source_boxes=false"],
                            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, f"127.0.0.1:{port}"


def test_haproxy_loses_no_request_when_a_replica_is_killed(phases_1_4, tmp_path):
    """Two tiny servers behind deploy/haproxy/haproxy.cfg, 16 clients for 36 s (a mix of /extract
    on a page and chat completions), one server SIGKILLed at 12 s: no client sees an error,
    and after the kill the survivor serves everything."""
    haproxy = need("haproxy")
    page = sorted((phases_1_4 / "datasets" / "test_images").glob("*.png"))[0].read_bytes()
    servers = [start_server(phases_1_4, tmp_path / f"api{i}.log") for i in (1, 2)]
    lb_port = free_port()
    env = {**os.environ, "MEDVL_LB_BIND": f"127.0.0.1:{lb_port}", "MEDVL_API_1": servers[0][1],
           "MEDVL_API_2": servers[1][1]}
    lb = None
    try:
        for (proc, address), i in zip(servers, (1, 2), strict=True):
            wait_ready(f"http://{address}", proc, 300, tmp_path / f"api{i}.log")
        lb = subprocess.Popen([haproxy, "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], env=env,
                              stdout=open(tmp_path / "haproxy.log", "w"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{lb_port}"
        wait_until_both_up(base, lb, tmp_path / "haproxy.log")

        outcomes: list[tuple[float, str, str]] = []  # (finished at, replica or error, route)
        lock = threading.Lock()
        started = time.monotonic()
        kill_at, stop_at = 12.0, 36.0

        def client(index: int) -> None:
            with httpx.Client(base_url=base, timeout=120) as http:
                n = 0
                while time.monotonic() - started < stop_at:
                    n += 1
                    route = "/extract" if (index + n) % 3 == 0 else "/v1/chat/completions"
                    try:
                        if route == "/extract":
                            r = http.post(route, files={"file": ("page.png", page, "image/png")})
                        else:
                            r = http.post(route, json={"model": "medvl", "max_tokens": 8 + 4 * (n % 3),
                                                       "messages": [{"role": "user", "content": f"Say {n}"}]})
                        what = r.headers.get("x-medvl-replica", "?") if r.status_code == 200 else f"HTTP {r.status_code}"
                    except httpx.HTTPError as exc:
                        what = f"{type(exc).__name__}"
                    with lock:
                        outcomes.append((time.monotonic() - started, what, route))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        time.sleep(kill_at)
        servers[0][0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic() - started
        for t in threads:
            t.join(timeout=180)
    finally:
        for proc, _ in servers:
            proc.kill()
        if lb is not None:
            lb.terminate()

    errors = [o for o in outcomes if not o[1].startswith("api")]
    before = Counter(what for at, what, _ in outcomes if at < killed_at)
    after = Counter(what for at, what, _ in outcomes if at > killed_at + 1)  # requests finished after the kill
    print(f"\nHAProxy, 16 clients, api1 SIGKILLed at {killed_at:.1f} s: before {dict(before)}, after {dict(after)}, "
          f"errors {len(errors)}, routes {dict(Counter(r for *_, r in outcomes))}")
    assert not errors, errors[:10]
    assert before["api1"] > 0 and before["api2"] > 0, before  # both served before the kill
    assert after["api2"] > 0 and after["api1"] == 0, after  # the survivor took the killed one's share
    assert sum(after.values()) >= 16


def wait_until_both_up(base: str, lb: subprocess.Popen, log: Path) -> None:
    """HAProxy sends traffic to a server after two good health checks (rise 2): wait until
    both have answered through it."""
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(seen) < 2:
        assert lb.poll() is None, log.read_text()[-2000:]
        try:
            r = httpx.get(f"{base}/health", timeout=5)
            if r.status_code == 200:
                seen.add(r.headers.get("x-medvl-replica", ""))
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert seen == {"api1", "api2"}, seen


# --------------------------------------------------------------------------- Kubernetes


def manifest_files() -> list[Path]:
    """deploy/kubernetes/*.yaml, the kustomization included (.checkov.yaml is not a manifest)."""
    return [p for p in sorted(KUBERNETES.glob("*.yaml")) if not p.name.startswith(".")]


def manifests() -> list[dict]:
    docs = []
    for path in manifest_files():
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") != "Kustomization"]
    return docs


def containers(kind_name: str) -> list[dict]:
    kind, name = kind_name.split("/")
    resource = next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)
    return resource["spec"]["template"]["spec"]["containers"]


def help_text(*module: str) -> str:
    result = run(sys.executable, "-m", *module, "--help", cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("resource", "module", "port_name"), [
    ("Deployment/medvl-api", ("medvl.http.server",), "http"),
    ("Deployment/medvl-demo", ("medvl.http.demo_ui",), "http"),
])
def test_manifest_commands_ports_probes_and_env_are_the_servers_own(resource, module, port_name):
    """What a pod runs is what the code takes: every flag its args pass and every MEDVL_
    variable its environment sets appear in the program's --help, the probes hit the port the
    args open, and the API's probes ask /health."""
    (container,) = containers(resource)
    usage = help_text(*module)
    command = container["command"] + container.get("args", [])
    program = {"medvl.http.server": "medvl-serve", "medvl.http.demo_ui": "medvl-demo"}[module[0]]
    assert command[0] == program
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'^{program} = "{module[0]}:main"$', pyproject, re.M)
    flags = [a.split("=")[0] for a in command[1:] if a.startswith("--")]
    assert flags and all(re.search(rf"\s{re.escape(f)}\b", usage) for f in flags), (flags, usage)
    env = {e["name"] for e in container.get("env", [])}
    assert env and all(name in usage for name in env if name.startswith("MEDVL_")), (env, usage)
    (port,) = [p for p in container["ports"] if p["name"] == port_name]
    opened = int(command[command.index("--port") + 1])
    assert port["containerPort"] == opened
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in (port_name, opened), (probe, get)
        if program == "medvl-serve":
            assert get["path"] == "/health"


def test_the_api_pod_asks_for_a_gpu_runs_unprivileged_and_reads_its_key_from_a_secret():
    (container,) = containers("Deployment/medvl-api")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["securityContext"]["runAsNonRoot"] is True
    key = next(e for e in container["env"] if e["name"] == "MEDVL_API_KEY")
    assert "secretKeyRef" in key["valueFrom"]
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in manifest_files()} - {"kustomization.yaml"}


def deploy_tools() -> Path:
    tools = REPO / ".venv-deploy" / "bin"
    if not (tools / "checkov").exists():
        message = "the deploy tool venv is missing (scripts/ensure_deploy_tools.sh makes .venv-deploy)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return tools


def test_the_validators_refuse_a_broken_and_an_unhardened_manifest(tmp_path):
    """The two validators can fail: a port given as a word where the schema wants a number, and
    the API Deployment stripped of its security context and resources."""
    tools = deploy_tools()
    api = yaml.safe_load((KUBERNETES / "api-deployment.yaml").read_text())
    broken = yaml.safe_load(yaml.safe_dump(api))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    result = run(str(tools / "kubernetes-validate"), "--strict", str(tmp_path / "broken.yaml"))
    assert result.returncode != 0, result.stdout + result.stderr
    bare = yaml.safe_load(yaml.safe_dump(api))
    container = bare["spec"]["template"]["spec"]["containers"][0]
    del container["securityContext"], container["resources"], bare["spec"]["template"]["spec"]["securityContext"]
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "api.yaml").write_text(yaml.safe_dump(bare))
    result = run(str(tools / "checkov"), "--quiet", "--compact", "--config-file", str(KUBERNETES / ".checkov.yaml"),
                 "-d", str(tmp_path / "bare"))
    assert result.returncode != 0 and "CKV_K8S_" in result.stdout, result.stdout[-2000:]


def test_kubernetes_manifests_validate_offline_and_pass_checkov():
    """kubernetes-validate (the Kubernetes schemas, offline) and checkov, from the tool venv
    scripts/ensure_deploy_tools.sh makes; checkov's accepted findings are skipped in
    deploy/kubernetes/.checkov.yaml, each with its reason."""
    tools = deploy_tools()
    files = [str(p) for p in manifest_files() if p.name != "kustomization.yaml"]
    result = run(str(tools / "kubernetes-validate"), "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(str(tools / "checkov"), "--quiet", "--compact", "--config-file",
                 str(KUBERNETES / ".checkov.yaml"), "-d", str(KUBERNETES))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
