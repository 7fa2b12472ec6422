"""The WebUI glue and REST API over a stand-in ``modules`` namespace holding a tiny real LDM model.

The stand-ins are what the glue touches in A1111: ``shared`` (cmd_opts, opts, state, sd_model), the GPU
``call_queue.queue_lock``, ``script_callbacks``, ``processing`` (txt2img for sample previews) and the built-in
Lora extension's ``networks`` (loaded list, rescan). Requests go through FastAPI's TestClient.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("ldm", reason="needs stable-diffusion-sdkit (requirements/ldm-test.txt)")
pytest.importorskip("pytorch_lightning", reason="needs pytorch_lightning<2 (requirements/ldm-test.txt)")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

import ldm_models as M  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from lora_train.engine.config.settings import TrainConfig  # noqa: E402
from lora_train.engine.config.yaml_io import from_dict  # noqa: E402
from lora_train.webui.host_snapshot import HostSnapshot  # noqa: E402

GLUE = Path(__file__).resolve().parent.parent / "scripts" / "lora_train_tab.py"
SMALL = dict(resolution="64", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, lora_rank=4,
             lora_alpha=4, learning_rate=1e-3, batch_size=2, log_every_n_steps=1, save_precision="float")


class FakeState:
    """shared.state: records what training reported."""

    def __init__(self) -> None:
        self.interrupted = False
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.events: list[str] = []
        self.texts: list[str] = []

    def __setattr__(self, name, value) -> None:
        if name == "textinfo" and value:
            self.texts.append(value)
        object.__setattr__(self, name, value)

    def begin(self, job: str = "(unknown)") -> None:
        self.events.append(f"begin:{job}")
        self.interrupted = False
        self.job = job

    def end(self) -> None:
        self.events.append("end")
        self.job = ""


class FIFOLikeLock:
    """The WebUI's queue lock (modules/fifo_lock.FIFOLock): acquire/release and a context manager, no locked()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = False

    def acquire(self, blocking: bool = True) -> bool:
        got = self._lock.acquire(blocking)
        self.held = self.held or got
        return got

    def release(self) -> None:
        self.held = False
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *args) -> None:
        self.release()


class FakeNetworkOnDisk:
    """extensions-builtin/Lora/network.py's entry: name, filename, alias (``ss_output_name``); reading a file's
    header and hash cache takes a moment, as there."""

    def __init__(self, name: str, filename: str) -> None:
        time.sleep(0.01)
        self.name, self.filename = name, filename
        self.alias = json.loads(Path(filename).with_suffix(".alias").read_text()) if Path(filename).with_suffix(
            ".alias").exists() else name


class FakeNetworks(types.ModuleType):
    """extensions-builtin/Lora/networks.py as A1111, reForge and Forge Classic have it: the module-level dicts, the
    ``network`` module, and a rescan that clears the list and then rebuilds it file by file."""

    def __init__(self, lora_dir: Path) -> None:
        super().__init__("networks")
        self.lora_dir = lora_dir
        self.loaded_networks = ["some_lora"]
        self.available_networks: dict[str, FakeNetworkOnDisk] = {}
        self.available_network_aliases: dict[str, FakeNetworkOnDisk] = {}
        self.forbidden_network_aliases: dict[str, int] = {}
        self.network = SimpleNamespace(NetworkOnDisk=FakeNetworkOnDisk)
        self.rescans = 0

    def list_available_networks(self) -> None:
        self.rescans += 1
        self.available_networks.clear()
        self.available_network_aliases.clear()
        self.forbidden_network_aliases.clear()
        for filename in sorted(self.lora_dir.rglob("*.safetensors")):
            entry = FakeNetworkOnDisk(filename.stem, str(filename))
            self.available_networks[entry.name] = entry
            if entry.alias in self.available_network_aliases:
                self.forbidden_network_aliases[entry.alias.lower()] = 1
            self.available_network_aliases[entry.name] = entry
            self.available_network_aliases[entry.alias] = entry


def _namespace(tmp_path: Path, model, **cmd) -> SimpleNamespace:
    webui = tmp_path / "webui"
    lora_dir = webui / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    lock = FIFOLikeLock()
    samples: list[dict] = []

    class Txt2Img:
        scripts = None  # as in the WebUI: a txt2img made in code has no script runner unless given one

        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

        def close(self) -> None:
            pass

    def process_images(p):
        assert lock.held, "samples are made while training holds the queue lock"
        # reForge reads the alwayson scripts without a None check (modules/processing.py at 3b56b268)
        assert not [s for s in p.scripts.alwayson_scripts if s.name == "advanced model sampling for reforge"]
        if p.kwargs["prompt"] == "break txt2img":
            raise RuntimeError("an extension broke txt2img")
        samples.append(p.kwargs)
        return SimpleNamespace(images=[Image.new("RGB", (p.kwargs["width"], p.kwargs["height"]), "blue")])

    callbacks: dict[str, list] = {"ui_tabs": [], "ui_settings": [], "app_started": []}
    options: dict[str, object] = {}
    opts = SimpleNamespace(add_option=lambda key, info: options.__setitem__(key, info))
    cmd_opts = SimpleNamespace(api=True, api_auth=None, lora_dir=str(lora_dir), data_dir=str(webui),
                               disable_extension_access=False)
    cmd_opts.__dict__.update(cmd)
    shared = SimpleNamespace(cmd_opts=cmd_opts, opts=opts, state=FakeState(), sd_model=model, interrogator=None,
                             OptionInfo=lambda *a, **k: SimpleNamespace(args=a, kwargs=k))
    modules = types.ModuleType("modules")
    modules.__path__ = []
    parts = {
        "shared": shared,
        "call_queue": SimpleNamespace(queue_lock=lock),
        "script_callbacks": SimpleNamespace(**{f"on_{k}": callbacks[k].append for k in callbacks}),
        "processing": SimpleNamespace(StableDiffusionProcessingTxt2Img=Txt2Img, process_images=process_images,
                                      scripts=SimpleNamespace(ScriptRunner=lambda: SimpleNamespace(
                                          alwayson_scripts=[]))),
        "paths": SimpleNamespace(models_path=str(webui / "models")),
        "deepbooru": SimpleNamespace(model=None),
    }
    for name, value in parts.items():
        setattr(modules, name, value)
    return SimpleNamespace(modules=modules, parts=parts, shared=shared, lock=lock, callbacks=callbacks,
                           options=options, lora_dir=lora_dir, webui=webui, samples=samples,
                           networks=FakeNetworks(lora_dir))


@pytest.fixture(scope="module")
def sd1_model():
    return M.tiny_sd1()


@pytest.fixture
def webui(tmp_path, monkeypatch, sd1_model, dataset_dir):
    """Loads the glue script against the stand-ins; ``make(**cmd_opts)`` gives (namespace, TestClient)."""

    def make(model=sd1_model, **cmd):
        ns = _namespace(tmp_path / f"w{len(made)}", model, **cmd)
        monkeypatch.setitem(sys.modules, "modules", ns.modules)
        for name, value in ns.parts.items():
            monkeypatch.setitem(sys.modules, f"modules.{name}", value)
        monkeypatch.setitem(sys.modules, "networks", ns.networks)
        spec = importlib.util.spec_from_file_location(f"lora_train_tab_{len(made)}", GLUE)
        glue = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(glue)
        app = FastAPI()
        for callback in ns.callbacks["app_started"]:
            callback(None, app)
        data = ns.webui / "datasets" / "shapes"
        data.parent.mkdir(parents=True)
        import shutil

        shutil.copytree(dataset_dir, data)
        ns.glue, ns.data = glue, data
        made.append(ns)
        return ns, TestClient(app)

    made: list = []
    yield make
    for ns in made:
        for job in ns.glue.RUNNER.jobs.values():
            job.stop_event.set()
            job.done_event.wait(60)


def _wait(client, job_id: str, headers=None, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get(f"/lora-train/v1/jobs/{job_id}", headers=headers).json()
        if status["state"] in ("done", "stopped", "failed"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {status}")


def test_train_on_the_loaded_model_into_the_lora_folder(webui, sd1_model) -> None:
    ns, client = webui()
    snapshot = HostSnapshot.take(sd1_model)
    body = {**SMALL, "train_data_dir": str(ns.data), "output_name": "shapes", "trigger_word": "shapez",
            "max_train_steps": 4, "sample_prompts": ["shapez, a red circle"], "sample_every_n_steps": 2,
            "sample_steps": 3}
    response = client.post("/lora-train/v1/jobs", json=body)
    assert response.status_code == 200, response.text
    status = _wait(client, response.json()["id"])
    assert status["state"] == "done", status
    assert (status["step"], status["total"]) == (4, 4) and status["loss"] > 0
    output = Path(status["output"])
    assert output == ns.lora_dir / "shapes.safetensors" and output.is_file()
    card = json.loads(output.with_suffix(".json").read_text())
    assert card["activation text"] == "shapez" and card["sd version"] == "SD1" and card["preferred weight"] == 0.7
    assert "4/4 steps" in card["description"]
    assert (ns.lora_dir / "shapes.preview.png").is_file()
    assert status["snippet"] == "<lora:shapes:0.7> shapez"
    # only the finished LoRA and its card go into models/Lora (the WebUI lists every .safetensors/.pt there)
    assert sorted(p.name for p in ns.lora_dir.rglob("*")) == ["shapes.json", "shapes.preview.png",
                                                               "shapes.safetensors"]
    run_folder = ns.webui / "outputs" / "lora-train"  # state and samples: outside the Lora folder
    assert (run_folder / "shapes-state" / "state.json").is_file() and any(run_folder.glob("sample/shapes_*.png"))
    # the WebUI's own machinery was used
    assert ns.shared.state.events == ["begin:LoRA training", "end"]
    assert any("step 4/4" in text for text in ns.shared.state.texts)
    assert [s["steps"] for s in ns.samples] == [3, 3] and ns.samples[0]["width"] == 64
    assert ns.networks.loaded_networks == [] and ns.networks.available_networks["shapes"].filename == str(output)
    assert not ns.lock.held
    snapshot.verify()
    # the same name again never overwrites
    again = client.post("/lora-train/v1/jobs", json={**body, "sample_every_n_steps": 0, "max_train_steps": 1})
    assert _wait(client, again.json()["id"])["output"] == str(ns.lora_dir / "shapes-2.safetensors")


def test_done_means_listed_every_lora_stays_listed_meanwhile(webui) -> None:
    """A client that reads the Lora list the moment a job says done finds the new LoRA and every one from before:
    the list is added to in place, never cleared and rebuilt (which a reader in between would see empty)."""
    ns, client = webui()
    for name in ("old-a", "old-b", "shapes"):
        (ns.lora_dir / f"{name}.safetensors").write_bytes(b"x")
    ns.networks.list_available_networks()
    (ns.lora_dir / "shapes.safetensors").unlink()  # deleted by the user, still listed until the next rescan
    before = set(ns.networks.available_networks)
    replaced = ns.networks.available_networks["shapes"]
    body = {**SMALL, "train_data_dir": str(ns.data), "max_train_steps": 1}
    seen: list[set[str]] = []
    for name in ("shapes", "fresh"):  # a name listed before, then a new one
        job = ns.glue.RUNNER.get(client.post("/lora-train/v1/jobs", json={**body, "output_name": name}).json()["id"])
        while job.state != "done":
            assert job.state in ("queued", "waiting", "running"), job.log
            time.sleep(0.0005)
        for _ in range(100):  # every 2 ms for 0.2 s from the moment it said done
            seen.append(set(ns.networks.available_networks))
            time.sleep(0.002)
        job.done_event.wait(30)
    assert all(listed >= before for listed in seen), "a LoRA listed before was missing while the job said done"
    assert all("fresh" in listed for listed in seen[100:]), "the new LoRA was not listed when the job said done"
    entry = ns.networks.available_networks["shapes"]
    assert entry is not replaced and entry.filename == str(ns.lora_dir / "shapes.safetensors")
    assert ns.networks.available_network_aliases["shapes"] is entry and not ns.networks.forbidden_network_aliases
    assert ns.networks.rescans == 1, "the job rescanned the whole Lora folder"


def test_a_failing_txt2img_preview_falls_back_to_the_engine_sampler(webui) -> None:
    ns, client = webui()
    body = {**SMALL, "train_data_dir": str(ns.data), "output_name": "fallback", "max_train_steps": 2,
            "sample_prompts": ["break txt2img"], "sample_every_n_steps": 2, "sample_steps": 2}
    status = _wait(client, client.post("/lora-train/v1/jobs", json=body).json()["id"])
    assert status["state"] == "done", status
    assert any("using the built-in sampler" in line for line in status["log"])
    assert Path(status["preview"]).is_file()


def test_stop_and_webui_interrupt_keep_what_was_trained(webui) -> None:
    ns, client = webui()
    body = {**SMALL, "train_data_dir": str(ns.data), "output_name": "long", "max_train_steps": 5000}
    job_id = client.post("/lora-train/v1/jobs", json=body).json()["id"]
    while client.get(f"/lora-train/v1/jobs/{job_id}").json()["step"] < 1:
        time.sleep(0.05)
    busy = client.post("/lora-train/v1/jobs", json=body)
    assert busy.status_code == 409
    assert client.post(f"/lora-train/v1/jobs/{job_id}/stop").status_code == 200
    status = _wait(client, job_id)
    assert status["state"] == "stopped" and 0 < status["step"] < 5000 and Path(status["output"]).is_file()

    job_id = client.post("/lora-train/v1/jobs", json={**body, "output_name": "interrupted"}).json()["id"]
    while client.get(f"/lora-train/v1/jobs/{job_id}").json()["step"] < 1:
        time.sleep(0.05)
    ns.shared.state.interrupted = True  # the WebUI's Interrupt button
    assert _wait(client, job_id)["state"] == "stopped"


def test_auth_when_api_auth_is_set(webui) -> None:
    _, client = webui(api_auth="alice:s3cr:et,bob:pw")
    assert client.get("/lora-train/v1/presets").status_code == 401
    wrong = base64.b64encode(b"alice:nope").decode()
    assert client.get("/lora-train/v1/presets", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    unknown = base64.b64encode(b"eve:pw").decode()
    assert client.get("/lora-train/v1/presets", headers={"Authorization": f"Basic {unknown}"}).status_code == 401
    right = base64.b64encode(b"alice:s3cr:et").decode()
    response = client.get("/lora-train/v1/presets", headers={"Authorization": f"Basic {right}"})
    assert response.status_code == 200
    assert response.json()["family"] == "sd1" and set(response.json()["names"]) == {"Character", "Style", "Concept"}
    assert client.post("/lora-train/v1/jobs", json={}).status_code == 401


def test_routes_only_with_api_flag(webui) -> None:
    _, client = webui(api=False)
    assert client.get("/lora-train/v1/presets").status_code == 404


def test_paths_outside_allowed_roots_are_refused(webui, tmp_path) -> None:
    ns, client = webui()
    outside = tmp_path / "outside"
    outside.mkdir()
    response = client.post("/lora-train/v1/jobs", json={"train_data_dir": str(outside)})
    assert response.status_code == 403
    detail = response.json()["detail"]
    assert detail["field"] == "train_data_dir" and "Extra allowed dataset folders" in detail["message"]
    ns.shared.opts.lora_train_allowed_dirs = str(outside)  # the Settings entry, read at each request
    response = client.post("/lora-train/v1/jobs", json={"train_data_dir": str(outside)})
    assert response.status_code != 403
    assert response.status_code == 422 or response.json()["state"] in ("waiting", "running", "queued")


def test_insecure_access_rule(webui) -> None:
    ns, client = webui(disable_extension_access=True)
    response = client.post("/lora-train/v1/jobs", json={"train_data_dir": str(ns.data)})
    assert response.status_code == 403
    assert "--enable-insecure-extension-access" in response.json()["detail"]["message"]
    assert client.get("/lora-train/v1/presets").status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"learnig_rate": 1e-4}, "learnig_rate"),
        ({"optimizer": "adamq"}, "optimizer"),
        ({"preset": "Portrait"}, "preset"),
        ({"train_data_dir": ""}, "train_data_dir"),
    ],
)
def test_bad_fields_answer_422_naming_the_field(webui, body, field) -> None:
    ns, client = webui()
    response = client.post("/lora-train/v1/jobs", json={"train_data_dir": str(ns.data), **body})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == field
    assert field in response.json()["detail"]["message"] or field == "preset"


# the CLI's sentence
ESCAPE_REFUSED = "config key 'output_name': '../escape' must be a plain file name without path separators"


def test_an_output_name_with_a_path_is_refused_as_the_cli_refuses_it(webui) -> None:
    ns, client = webui()
    response = client.post("/lora-train/v1/jobs", json={"train_data_dir": str(ns.data), "output_name": "../escape"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == {"field": "output_name", "message": ESCAPE_REFUSED}
    assert ns.glue.RUNNER.jobs == {}


def test_no_model_loaded_starts_nothing(webui) -> None:
    ns, client = webui(model=None)
    response = client.post("/lora-train/v1/jobs", json={"train_data_dir": str(ns.data)})
    assert response.status_code == 409
    assert "No checkpoint is loaded" in response.json()["detail"]["message"]
    assert ns.glue.RUNNER.jobs == {} and ns.shared.state.events == []
    assert client.get("/lora-train/v1/jobs/nope").status_code == 404


def test_settings_and_tab_registered(webui) -> None:
    ns, _ = webui()
    for callback in ns.callbacks["ui_settings"]:
        callback()
    assert set(ns.options) == {"lora_train_output_dir", "lora_train_run_dir", "lora_train_default_preset",
                               "lora_train_captioner_weights", "lora_train_full_host_check", "lora_train_allowed_dirs",
                               "lora_train_allow_downloads"}
    assert all(info.kwargs["section"] == ("lora_train", "LoRA Train") for info in ns.options.values())
    assert all(info.category_id == "training" for info in ns.options.values())  # not "Uncategorized"
    ns.shared.opts.lora_train_run_dir = str(ns.lora_dir / "runs")  # would put .pt/.safetensors state among cards
    assert not ns.glue.run_dir().is_relative_to(ns.lora_dir)
    assert ns.glue.output_dir() == ns.lora_dir.resolve()
    ns.shared.opts.lora_train_output_dir = str(ns.lora_dir / "mine")
    assert ns.glue.output_dir() == (ns.lora_dir / "mine").resolve()
    ns.shared.opts.lora_train_output_dir = str(ns.webui)  # outside the Lora folder: ignored
    assert ns.glue.output_dir() == ns.lora_dir.resolve()
    tabs = [tab for callback in ns.callbacks["ui_tabs"] for tab in callback()]
    assert [(title, elem_id) for _, title, elem_id in tabs] == [("LoRA Train", "lora_train")]


def test_tab_builds_on_forge_classic_which_removed_deepbooru_and_blip(webui, monkeypatch) -> None:
    ns, _ = webui()
    monkeypatch.delattr(ns.modules, "deepbooru")
    monkeypatch.setitem(sys.modules, "modules.deepbooru", None)  # import fails, as there
    del ns.shared.interrogator
    tabs = [tab for callback in ns.callbacks["ui_tabs"] for tab in callback()]
    assert [(title, elem_id) for _, title, elem_id in tabs] == [("LoRA Train", "lora_train")]


def test_every_path_is_checked_at_submit(webui, tmp_path) -> None:
    ns, client = webui()
    cases = {
        "train_data_dir": str(ns.webui / "datasets" / "missing"),
        "reg_data_dir": str(ns.webui / "nothing-here"),
        "network_weights": str(ns.lora_dir / "missing.safetensors"),
        "metadata_path": str(ns.data),  # a folder where a file is expected
    }
    for key, value in cases.items():
        response = client.post("/lora-train/v1/jobs", json={**SMALL, "train_data_dir": str(ns.data), key: value})
        assert response.status_code == 422, (key, response.text)
        detail = response.json()["detail"]
        assert detail["field"] == key and value in detail["message"], detail
    assert ns.glue.RUNNER.jobs == {} and ns.shared.state.events == []


def test_progress_waits_visibly_for_the_webui_queue(webui) -> None:
    ns, client = webui()
    ns.lock.acquire()  # a txt2img is running
    body = {**SMALL, "train_data_dir": str(ns.data), "output_name": "queued", "max_train_steps": 2}
    job_id = client.post("/lora-train/v1/jobs", json=body).json()["id"]
    deadline = time.time() + 30
    url = f"/lora-train/v1/jobs/{job_id}"
    while not any("waiting for the WebUI" in line for line in client.get(url).json()["log"]):
        assert time.time() < deadline, "the job never said it waits for the WebUI"
        time.sleep(0.05)
    assert client.get(f"/lora-train/v1/jobs/{job_id}").json()["state"] == "waiting"
    ns.lock.release()
    assert _wait(client, job_id)["state"] == "done"


@pytest.mark.parametrize(("flags", "named"), [({"server_name": "127.0.0.1"}, "--server-name"),
                                              ({"listen": True}, "--listen"), ({"share": True}, "--share")])
def test_path_refusal_names_the_flag_and_api_auth_lifts_it(webui, flags, named) -> None:
    ns, client = webui(disable_extension_access=True, **flags)
    response = client.post("/lora-train/v1/jobs", json={"train_data_dir": str(ns.data)})
    assert response.status_code == 403
    message = response.json()["detail"]["message"]
    assert named in message and "--enable-insecure-extension-access" in message and "--api-auth" in message
    ns, client = webui(disable_extension_access=True, api_auth="me:pw", **flags)
    auth = {"Authorization": "Basic " + base64.b64encode(b"me:pw").decode()}
    body = {**SMALL, "train_data_dir": str(ns.data), "max_train_steps": 1}
    response = client.post("/lora-train/v1/jobs", json=body, headers=auth)
    assert response.status_code == 200, response.text
    assert _wait(client, response.json()["id"], headers=auth)["state"] == "done"


def test_presets_on_a_cpu_host_train_in_full_precision(webui) -> None:
    _, client = webui()
    presets = client.get("/lora-train/v1/presets").json()["presets"]
    assert {values["mixed_precision"] for values in presets.values()} == {"no"}


def test_offloaded_or_fp8_models_are_refused(webui, sd1_model) -> None:
    ns, client = webui()
    sd1_model.lowvram = True  # what --medvram-sdxl sets on an SDXL model
    try:
        response = client.post("/lora-train/v1/jobs", json={**SMALL, "train_data_dir": str(ns.data)})
    finally:
        del sd1_model.lowvram
    assert response.status_code == 409 and "moves parts of the model" in response.json()["detail"]["message"]
    ns, client = webui(medvram_sdxl=True, lowvram=True)
    response = client.post("/lora-train/v1/jobs", json={**SMALL, "train_data_dir": str(ns.data)})
    assert response.status_code == 409 and "--lowvram" in response.json()["detail"]["message"]


def test_fp8_weights_are_refused(webui) -> None:
    fp8 = torch.nn.Linear(2, 2).to(torch.float8_e4m3fn)
    model = torch.nn.Sequential(fp8)
    ns, client = webui(model=model)
    response = client.post("/lora-train/v1/jobs", json={**SMALL, "train_data_dir": str(ns.data)})
    assert response.status_code == 409 and "FP8" in response.json()["detail"]["message"]


def test_previews_pin_the_checkpoint_under_training(webui, sd1_model) -> None:
    ns, client = webui()
    sd1_model.sd_checkpoint_info = SimpleNamespace(title="tiny.safetensors [0123456789]")
    try:
        body = {**SMALL, "train_data_dir": str(ns.data), "output_name": "pinned", "max_train_steps": 1,
                "sample_prompts": ["a red circle"], "sample_every_n_steps": 1, "sample_steps": 2}
        assert _wait(client, client.post("/lora-train/v1/jobs", json=body).json()["id"])["state"] == "done"
    finally:
        del sd1_model.sd_checkpoint_info
    assert ns.samples[0]["override_settings"] == {"sd_model_checkpoint": "tiny.safetensors [0123456789]"}
    assert ns.samples[0]["override_settings_restore_afterwards"] is True


def test_reload_ui_keeps_the_running_job(webui, sd1_model) -> None:
    ns, client = webui()
    body = {**SMALL, "train_data_dir": str(ns.data), "output_name": "survivor", "max_train_steps": 5000}
    job_id = client.post("/lora-train/v1/jobs", json=body).json()["id"]
    spec = importlib.util.spec_from_file_location("lora_train_tab_reloaded", GLUE)
    reloaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reloaded)  # what "Reload UI" does: the script runs again
    assert reloaded.RUNNER is ns.glue.RUNNER and reloaded.RUNNER.get(job_id) is not None
    app = FastAPI()
    ns.callbacks["app_started"][-1](None, app)
    new_client = TestClient(app)
    assert new_client.post("/lora-train/v1/jobs", json=body).status_code == 409
    assert new_client.post(f"/lora-train/v1/jobs/{job_id}/stop").status_code == 200
    assert _wait(new_client, job_id)["state"] == "stopped"


def test_captioning_holds_the_webui_queue_so_training_waits(webui) -> None:
    ns, client = webui()
    body = {**SMALL, "train_data_dir": str(ns.data), "output_name": "after-captions", "max_train_steps": 1}
    with ns.glue.RUNNER.host.exclusive("LoRA captioning"):
        assert ns.lock.held and ns.shared.state.job == "LoRA captioning"
        job_id = client.post("/lora-train/v1/jobs", json=body).json()["id"]
        time.sleep(0.5)
        assert client.get(f"/lora-train/v1/jobs/{job_id}").json()["state"] == "waiting"
    assert _wait(client, job_id)["state"] == "done"
    assert ns.shared.state.events[:2] == ["begin:LoRA captioning", "end"]


def test_inputs_the_run_would_trip_on_are_refused_at_submit(webui) -> None:
    ns, client = webui()
    (ns.data / "broken.png").write_bytes(b"not a png")
    response = client.post("/lora-train/v1/jobs", json={**SMALL, "train_data_dir": str(ns.data)})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "train_data_dir"
    assert "broken.png" in response.json()["detail"]["message"]
    (ns.data / "broken.png").unlink()
    response = client.post("/lora-train/v1/jobs", json={**SMALL, "train_data_dir": str(ns.data),
                                                        "logging_dir": str(ns.lora_dir / "logs")})
    if importlib.util.find_spec("tensorboard") is None:  # the WebUI's venv: no tensorboard
        assert response.status_code == 422 and response.json()["detail"]["field"] == "logging_dir"
        assert "tensorboard" in response.json()["detail"]["message"]
        assert ns.glue.RUNNER.jobs == {}
    else:
        assert response.status_code == 200, response.text


def test_schema_describes_every_key_a_job_accepts(webui) -> None:
    _, client = webui()
    response = client.get("/lora-train/v1/schema")
    assert response.status_code == 200
    fields = {f["name"]: f for f in response.json()["fields"]}
    assert list(fields) == list(TrainConfig.__dataclass_fields__)
    assert from_dict({name: f["default"] for name, f in fields.items()}) == TrainConfig()  # defaults are real
    rank, alpha = fields["lora_rank"], fields["lora_alpha"]
    assert (rank["label"], rank["group"], rank["type"], rank["aliases"]) == (
        "Rank (network_dim)", "Model and network", "int", ["network_dim"])
    assert "alpha / rank" in alpha["help"] and alpha["aliases"] == ["network_alpha", "alpha"]
    assert fields["optimizer"]["choices"] == ["adamw", "adamw8bit", "prodigy", "sgd"]
    assert (fields["loss_type"]["choices"], fields["huber_c"]["group"]) == (["l2", "l1", "huber", "smooth_l1"],
                                                                           "Noise and loss")
    assert fields["max_train_steps"]["nullable"] is True and fields["max_train_steps"]["default"] is None
    assert fields["train_text_encoder"]["inverted_aliases"] == ["network_train_unet_only"]
    assert (fields["base_model"]["scope"], fields["output_dir"]["scope"], fields["seed"]["scope"]) == (
        "standalone", "cli", "both")


def test_doctor_reports_blocks_the_job_with_the_same_sentence_and_fixes(webui, tmp_path) -> None:
    ns, client = webui()
    Image.new("RGB", (2, 2), "red").save(ns.data / "speck.png")
    (ns.data / "speck.txt").write_text("shapez, a speck")
    body = {**SMALL, "train_data_dir": str(ns.data), "trigger_word": "shapez", "preset": "Character"}
    response = client.post("/lora-train/v1/doctor", json=body)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["ok"] is False and report["counts"]["error"] == 1
    finding = next(f for f in report["findings"] if f["severity"] == "error")
    assert finding["code"] == "image-too-small" and finding["files"][0]["path"] == str(ns.data / "speck.png")
    assert "Character" in next(f for f in report["findings"] if f["code"] == "few-images")["message"]
    refused = client.post("/lora-train/v1/jobs", json=body)
    assert refused.status_code == 422 and finding["message"] in refused.json()["detail"]["message"]
    assert ns.glue.RUNNER.jobs == {}
    fixed = client.post("/lora-train/v1/doctor/fix", json={**body, "fix": "exclude"})
    assert fixed.status_code == 200, fixed.text
    assert fixed.json()["report"]["ok"] is True and "Moved 1 image(s)" in fixed.json()["summary"]
    assert (ns.data / "_excluded" / "speck.png").is_file() and not (ns.data / "speck.png").exists()
    outside = tmp_path / "outside"
    outside.mkdir()
    assert client.post("/lora-train/v1/doctor", json={"train_data_dir": str(outside)}).status_code == 403
    assert client.post("/lora-train/v1/doctor/fix", json={**body, "fix": "delete"}).status_code == 422


def test_a_long_session_keeps_the_newest_jobs_and_forgets_the_oldest() -> None:
    from lora_train.webui.jobs import MAX_KEPT_JOBS, remember

    jobs: dict[str, int] = {}
    for n in range(MAX_KEPT_JOBS + 5):
        remember(jobs, f"job{n}", n)
    assert list(jobs) == [f"job{n}" for n in range(5, MAX_KEPT_JOBS + 5)]
