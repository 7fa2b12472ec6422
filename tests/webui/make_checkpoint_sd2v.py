#!/usr/bin/env python3
"""Build a random-weight SD2.1 768-v checkpoint (fp32 .safetensors, ~5 GiB) that the WebUI loads as 768-v.

Run with the WebUI's python (it has ldm and open_clip), HF_HOME unused (nothing is downloaded):
    $VENV_DIR/bin/python tests/webui/make_checkpoint_sd2v.py --webui $WEBUI_DIR --out FILE.safetensors
then boot it with ``WEBUI_CKPT=FILE`` (tests/webui/run.sh passes the environment on to the harness' boot.sh).

- The model is ldm's LatentDiffusion from the WebUI's own v2-inference-v.yaml
  (repositories/stable-diffusion-stability-ai), so keys and shapes are an SD2.1-v checkpoint's; open_clip is
  asked for no pretrained weights (ViT-H-14 text tower, 24 layers, width 1024; its visual tower deleted by ldm).
- ``FILE.yaml`` (a copy of v2-inference-v.yaml) is written beside it: A1111's own name for a checkpoint's config,
  which skips the guess below. Booted on CPU with --no-half, A1111 v1.10.1 cannot load an SD2 checkpoint
  without it, whatever the file's dtype: its v-test casts the UNet to ``devices.dtype_unet``, still fp16 at the
  first load (set to fp32 only later, in load_model_weights), and feeds it fp32 inputs ("Input type (float) and
  bias type (c10::Half)"; seen 2026-12-05 with an fp16 and an fp32 file; a bug in the WebUI, not ours).
- Saved in fp32, the precision --no-half runs it in.
- Zero-initialised output layers are re-randomised (as the harness' SD1.5/SDXL makers do), so every block counts.
- v-prediction is not in an SD2 checkpoint's weights: without a yaml (on a GPU, say) A1111 v1.10.1 guesses it
  (``sd_models_config.is_using_v_parameterization_for_sd2``: the UNet at t=999 on a constant input must return a
  mean below -1 minus the input). The maker runs that same test and shifts the UNet's last bias until the WebUI
  will pick v2-inference-v.yaml, and asserts it.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time


def rerandomise_zero_layers(model, torch) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            weight = module.weight
            if weight is not None and weight.numel() and not torch.any(weight):
                bound = 1.0 / math.sqrt(weight[0].numel())
                torch.nn.init.uniform_(weight, -bound, bound)
                count += 1
    return count


def webui_v_test(unet, torch) -> float:
    """What A1111's is_using_v_parameterization_for_sd2 computes; the WebUI says v when it is below -1."""
    test_cond = torch.ones((1, 2, 1024)) * 0.5
    x_test = torch.ones((1, 4, 8, 8)) * 0.5
    return float((unet(x_test, torch.asarray([999]), context=test_cond) - x_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--webui", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    started = time.time()
    repo = os.path.join(os.path.abspath(args.webui), "repositories", "stable-diffusion-stability-ai")
    sys.path.insert(0, repo)
    import open_clip
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    original = open_clip.create_model_and_transforms

    def without_pretrained(*a, pretrained=None, **kw):
        return original(*a, pretrained=None, **kw)

    open_clip.create_model_and_transforms = without_pretrained
    torch.manual_seed(args.seed)
    torch.set_grad_enabled(False)
    config = OmegaConf.load(os.path.join(repo, "configs", "stable-diffusion", "v2-inference-v.yaml"))
    assert config.model.params.parameterization == "v"
    config.model.params.unet_config.params.use_fp16 = False  # fp32 weights, saved as they are
    model = instantiate_from_config(config.model).eval()
    print(f"re-randomised {rerandomise_zero_layers(model, torch)} zero-initialised layers")
    unet = model.model.diffusion_model
    for module in unet.modules():  # the test runs without ldm's checkpointing, as the WebUI's does
        if hasattr(module, "checkpoint"):
            module.checkpoint = False
    value = webui_v_test(unet, torch)
    if value >= -1:
        unet.out[2].bias -= value + 3.0  # a constant shift of the output: the mean becomes about -3
        value = webui_v_test(unet, torch)
    assert value < -1, value
    print(f"the WebUI's v-parameterization test gives {value:.2f} (< -1: loaded as 768-v)")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.23.") for k in tensors)
    tmp = args.out + ".part"
    save_file(tensors, tmp, metadata={"format": "pt", "acceptance_harness": f"random SD2.1-v, seed {args.seed}"})
    os.replace(tmp, args.out)
    config_beside = os.path.splitext(args.out)[0] + ".yaml"
    shutil.copyfile(os.path.join(repo, "configs", "stable-diffusion", "v2-inference-v.yaml"), config_beside)
    print(f"wrote {config_beside}: the WebUI takes the config from it instead of guessing")
    print(f"saved {len(tensors)} tensors to {args.out} ({os.path.getsize(args.out) / 2**30:.2f} GiB) in "
          f"{time.time() - started:.0f}s; peak RSS {open('/proc/self/status').read().split('VmHWM:')[1].split()[0]} kB")


if __name__ == "__main__":
    main()
