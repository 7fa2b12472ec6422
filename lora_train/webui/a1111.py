"""The WebUI as a TrainHost: train on the checkpoint it has loaded, politely.

Nothing here imports A1111: the glue script hands in ``modules.shared``, the GPU ``queue_lock`` and a getter
for the built-in Lora extension's ``networks`` module, so the same code runs in tests over stand-ins.
While a job trains it holds the queue lock (txt2img waits instead of fighting for VRAM), shows progress in
the WebUI's own progress fields, and treats the Interrupt button as Stop. What differs between A1111 and the
Forge family (undoing the built-in Lora loader's merge, run-scoped patches) is decided per job from the loaded
model by ``host_detect.detect_host``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from lora_train.engine.config.settings import TrainConfig
from lora_train.engine.model import ModelBundle
from lora_train.engine.train.samples import SampleFn
from lora_train.webui.builtin_lora import list_lora
from lora_train.webui.host_detect import LoadedModel, detect_host
from lora_train.webui.host_snapshot import HostSnapshot
from lora_train.webui.jobs import HostError, Job, JobRunner, TrainHost
from lora_train.webui.webui_txt2img import txt2img

NO_MODEL = ("No checkpoint is loaded in the WebUI. Pick an SD1, SD2 or SDXL checkpoint in the dropdown at the "
            "top of the page, then press Train again.")
JOB_NAME = "LoRA training"
FP8_DTYPES = {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)}
_RUNNERS: dict[int, tuple[Any, JobRunner]] = {}


def persistent_runner(shared: Any, make: Callable[[], JobRunner]) -> JobRunner:
    """The one job runner of this WebUI process, made on first use.

    "Reload UI" executes the extension's scripts again, but this package stays imported: keeping the runner here
    means a running job can still be seen and stopped afterwards, and the one-job-at-a-time guard holds.
    """
    kept = _RUNNERS.get(id(shared))
    if kept is None or kept[0] is not shared:
        kept = _RUNNERS[id(shared)] = (shared, make())
    return kept[1]


@contextmanager
def holding(lock: Any, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold the WebUI's queue lock, calling ``on_wait`` first when someone else holds it.

    The WebUI's lock is a FIFOLock, which has no ``locked()``: a non-blocking acquire is the only honest test.
    """
    if not lock.acquire(blocking=False):
        on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class WebUIHost(TrainHost):
    """Adapter over ``modules.shared`` (``sd_model``, ``state``), the queue lock and the Lora extension.

    ``model_management`` gives Forge's model manager on the Forge family (None on A1111); ``reload_model`` is Forge 2's
    ``sd_models.forge_model_reload``, which loads the checkpoint the dropdown names as each generation does first.
    """

    in_webui = True

    def __init__(
        self,
        shared: Any,
        queue_lock: AbstractContextManager,
        networks: Callable[[], Any | None] = lambda: None,
        sample_fn: Callable[[TrainConfig, Callable[[str], None]], SampleFn | None] | None = None,
        full_host_check: Callable[[], bool] = lambda: False,
        model_management: Callable[[], Any | None] = lambda: None,
        reload_model: Callable[[], Any] | None = None,
        processing: Callable[[], Any | None] = lambda: None,
    ):
        self.shared = shared
        self.queue_lock = queue_lock
        self.networks = networks
        self.make_sample_fn = sample_fn
        self.full_host_check = full_host_check
        self.model_management = model_management
        self.reload_model = reload_model
        self.processing = processing  # modules.processing, for the grid

    @property
    def state(self) -> Any:
        return self.shared.state

    def _model_or_none(self) -> Any:
        """``shared.sd_model``, or None when there is none or loading it fails: the WebUI loads the checkpoint on
        first access, and a checkpoint it cannot load must not take the tab down with it (the job says why)."""
        try:
            return getattr(self.shared, "sd_model", None)
        except Exception:  # noqa: BLE001 - whatever the WebUI's loader raises, the tab still builds
            return None

    def family(self) -> str | None:
        model = self._model_or_none()
        if model is None:
            return None
        try:
            return detect_host(model, self.model_management).family(model)
        except (ValueError, HostError):
            return None

    def device_type(self) -> str:
        model = self._model_or_none()
        try:
            weights = detect_host(model, self.model_management).weights(model) if model is not None else None
        except HostError:
            weights = None
        parameter = next(weights.parameters(), None) if isinstance(weights, torch.nn.Module) else None
        return parameter.device.type if parameter is not None else super().device_type()

    def _loaded(self) -> tuple[Any, LoadedModel]:
        """The loaded model and the adapter of the WebUI that loaded it (HostError when there is none we train)."""
        model = getattr(self.shared, "sd_model", None)
        if model is None:
            raise HostError(NO_MODEL)
        return model, detect_host(model, self.model_management)

    def _bundle(self, cfg: TrainConfig) -> ModelBundle:
        model, host = self._loaded()
        problem = host.storage_problem(model) or _untrainable_storage(self.shared, host.weights(model))
        if problem:
            raise HostError(problem)
        parameterization = None if cfg.v_parameterization is None else ("v" if cfg.v_parameterization else "eps")
        clip_skip, sdxl_clip_l_skip = self.clip_skip(cfg)
        try:
            bundle = host.bundle(model, clip_skip=clip_skip, parameterization=parameterization,
                                 sdxl_clip_l_skip=sdxl_clip_l_skip, zero_terminal_snr=self.zero_terminal_snr())
        except ValueError as exc:
            raise HostError(f"The loaded checkpoint cannot be trained here: {exc}") from None
        return bundle

    def clip_skip(self, cfg: TrainConfig) -> tuple[int, bool]:
        """The clip skip to train with (the config's, else the WebUI's "Clip skip" it generates with) and whether
        SDXL's CLIP-L follows it (the WebUI's "Clip skip SDXL")."""
        opts = getattr(self.shared, "opts", None)
        host = int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1)
        return (cfg.clip_skip if cfg.clip_skip is not None else host), bool(getattr(opts, "sdxl_clip_l_skip", False))

    def zero_terminal_snr(self) -> bool:
        """Whether the WebUI samples with "Noise schedule for sampling: Zero Terminal SNR"."""
        return getattr(getattr(self.shared, "opts", None), "sd_noise_schedule", "Default") == "Zero Terminal SNR"

    def generation_notes(self) -> dict[str, str]:
        clip_skip, sdxl = self.clip_skip(TrainConfig())
        note = f"unset: the WebUI's Clip skip, now {clip_skip}"
        if self.family() == "sdxl":
            note += " (SDXL CLIP-L: " + ("follows it" if sdxl else "its own layer; \"Clip skip SDXL\" is off") + ")"
        schedule = "Zero Terminal SNR" if self.zero_terminal_snr() else "Default"
        return {"clip_skip": note, "zero_terminal_snr": f"unset: the WebUI's noise schedule, now {schedule}"}

    def _load_selected(self, blocking: bool) -> None:
        """Forge 2 loads a checkpoint at the first generation: load it as a generation would, so that training
        trains the checkpoint the dropdown names. Not ``blocking``: only when no generation holds the GPU."""
        if self.reload_model is None:
            return
        if blocking:
            self.reload_model()
        elif self.queue_lock.acquire(blocking=False):
            try:
                self.reload_model()
            finally:
                self.queue_lock.release()

    def check(self, cfg: TrainConfig) -> None:
        self._load_selected(blocking=False)
        if self.reload_model is not None and not hasattr(getattr(self.shared, "sd_model", None), "forge_objects"):
            return  # not loaded yet because a generation holds the GPU: the session loads and checks it
        self._bundle(cfg)

    @contextmanager
    def session(self, cfg: TrainConfig, job: Job) -> Iterator[tuple[ModelBundle, SampleFn | None]]:
        def waiting() -> None:
            job.add_log("waiting for the WebUI to finish its current generation")

        with self.exclusive(JOB_NAME, waiting):
            self._load_selected(blocking=True)
            model, host = self._loaded()
            host.undo_prompt_lora(model, self.networks(), job.add_log)
            _unload_captioner()
            bundle = self._bundle(cfg)  # the model may have changed while we waited for the lock
            job.add_log(f"training on the loaded {bundle.family.upper()} checkpoint {bundle.model_name}")
            if cfg.clip_skip is None:
                cfg.clip_skip = bundle.clip_skip  # what the LoRA's ss_clip_skip records
                job.add_log(f"clip_skip {bundle.clip_skip}: the WebUI's Clip skip setting")
            if cfg.zero_terminal_snr is None:
                cfg.zero_terminal_snr = bundle.zero_terminal_snr  # ss_zero_terminal_snr records it
                if bundle.zero_terminal_snr:
                    job.add_log("zero_terminal_snr: the WebUI samples with Zero Terminal SNR, so training does too")
            if cfg.mixed_precision == "no" and bundle.dtype in (torch.float16, torch.bfloat16):
                # fp32 LoRA over half-precision host weights needs autocast to match their dtype
                cfg.mixed_precision = "bf16" if bundle.dtype == torch.bfloat16 else "fp16"
                job.add_log(f"mixed_precision set to {cfg.mixed_precision} to match the loaded weights")
            full = self.full_host_check()
            started = time.perf_counter()
            snapshot = HostSnapshot.take(host.weights(model), full=full)
            kind = "full hash" if full else "quick check"
            job.add_log(f"host snapshot ({kind}) in {time.perf_counter() - started:.1f} s")
            sample_fn = self.make_sample_fn(cfg, job.add_log) if self.make_sample_fn else None
            with host.run_scope(model, job.add_log):
                yield bundle, sample_fn
            job.add_log(f"checking that the loaded model is unchanged ({kind})")
            snapshot.verify()

    @contextmanager
    def exclusive(self, what: str, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Hold the queue lock and show ``what`` as the WebUI's current job (txt2img waits meanwhile)."""
        with holding(self.queue_lock, on_wait):
            state = self.state
            if hasattr(state, "begin"):
                state.begin(job=what)
            try:
                yield
            finally:
                state.textinfo = None
                if hasattr(state, "end"):
                    state.end()

    @contextmanager
    def grid_session(self, spec: Any, log: Callable[[str], None]) -> Iterator[Any]:
        """The grid through txt2img (webui_grid) under the queue lock; the loaded model is checked unchanged after,
        with no ``<lora:…>`` merge left in it."""
        from lora_train.webui.webui_grid import registered, webui_renderer

        networks = self.networks()
        if networks is None or self.processing() is None:
            raise HostError("the grid needs the WebUI's built-in Lora extension (Extensions > Installed: enable "
                            "Lora) and its txt2img")
        with self.exclusive("LoRA grid", lambda: log("waiting for the WebUI to finish its current generation")):
            model, host = self._loaded()
            host.undo_prompt_lora(model, networks, log)
            # every byte: the Lora extension writes each weight in place and back, which the quick check's version
            # counters would count as a change
            snapshot = HostSnapshot.take(host.weights(model), full=True)
            try:
                with registered(networks, spec.rows) as names:
                    yield webui_renderer(self.processing(), self.shared, spec, names)
            finally:
                host.undo_prompt_lora(model, networks, log)
            # every byte and where it lives; not the requires_grad flags, which Forge's own unpatch resets
            snapshot.verify(requires_grad=False)
            log("the loaded model is unchanged after the grid")

    def report(self, job: Job) -> None:
        state = self.state
        state.job = JOB_NAME
        state.job_count = 1
        state.job_no = 0
        state.sampling_step = job.step
        state.sampling_steps = job.total
        loss = f", loss {job.loss:.4f}" if job.loss is not None else ""
        state.textinfo = f"LoRA {job.cfg.output_name}: step {job.step}/{job.total}{loss}"

    def interrupted(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))

    def list_output(self, job: Job) -> None:
        """Add the new LoRA to the Lora list in place, so its card shows and ``<lora:name>`` resolves (also for a
        replaced name) without the list ever being empty. The queue lock is already held (inside ``session``)."""
        networks = self.networks()
        if networks is None or job.output is None:
            return
        try:
            list_lora(networks, job.output)
        except Exception as exc:  # noqa: BLE001 - a failed listing must not turn a good run into a failure
            job.add_log(f"could not add {job.output.name} to the Lora list ({exc}); press the refresh button in "
                        "the Lora tab")


def _untrainable_storage(shared: Any, model: Any) -> str | None:
    """Why the loaded model's weights cannot be trained where they are, or None.

    --lowvram/--medvram (and --medvram-sdxl on an SDXL model, which sets ``sd_model.lowvram``) move parts of the
    model between GPU and CPU around each forward; FP8 weight storage keeps weights in a dtype no optimizer
    step or autograd pass through them supports.
    """
    options = getattr(shared, "cmd_opts", None)
    flags = [f"--{flag}" for flag in ("lowvram", "medvram") if getattr(options, flag, False)]
    if not flags and getattr(model, "lowvram", False):
        flags = ["--medvram-sdxl" if getattr(options, "medvram_sdxl", False) else "low-VRAM offloading"]
    if flags:
        return (f"The WebUI runs with {flags[0]}, which moves parts of the model between GPU and CPU during "
                "generation; training needs the whole model on the GPU. Restart without it to train here, or use "
                "`python -m lora_train train` outside the WebUI.")
    if FP8_DTYPES and any(p.dtype in FP8_DTYPES for p in model.parameters()):
        return ("The loaded checkpoint's weights are stored in FP8 (Settings > Optimizations > FP8 weight); training "
                "needs fp16, bf16 or fp32 weights. Set FP8 weight to Disable, reload the checkpoint, then train.")
    return None


def _unload_captioner() -> None:
    try:
        from lora_train.caption import loaded
    except ImportError:
        return
    loaded.unload()


def txt2img_sampler(processing: Any, shared: Any, cfg: TrainConfig, log: Callable[[str], None] = print) -> SampleFn:
    """Preview images made by the WebUI's own txt2img pipeline, so they look as txt2img will.

    ``processing`` is ``modules.processing``. Called from the training thread, which already holds the queue
    lock, so it uses ``process_images`` directly (it takes no lock itself). Should the WebUI's pipeline fail
    (an extension hooked into it, a changed signature), previews come from the engine's own sampler instead of
    failing the run: a preview is never worth losing a training run for.
    """
    height, width = cfg.resolution_hw

    def sample(bundle: ModelBundle, prompts: list[str], step: int) -> list:
        try:
            return webui_sample(bundle, prompts, step)
        except Exception as exc:  # noqa: BLE001 - see above
            try:
                from lora_train.engine.train.sampler import (
                    sample_images,  # needs diffusers, which the WebUI's venv may lack
                )
            except ImportError:
                log(f"txt2img preview failed ({type(exc).__name__}: {exc}); no preview at step {step}")
                return []
            log(f"txt2img preview failed ({type(exc).__name__}: {exc}); using the built-in sampler")
            return sample_images(bundle, prompts, height, width, cfg.sample_steps, cfg.sample_cfg_scale, cfg.seed)

    def webui_sample(bundle: ModelBundle, prompts: list[str], step: int) -> list:
        images = []
        for prompt in prompts:
            processed = txt2img(
                processing, shared, "a training preview", prompt=prompt, negative_prompt="", steps=cfg.sample_steps,
                cfg_scale=cfg.sample_cfg_scale, width=width, height=height, seed=cfg.seed,
            )
            images.extend(processed.images[:1])
        return images

    return sample
