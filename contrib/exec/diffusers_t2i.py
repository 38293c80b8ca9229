#!/usr/bin/python3
"""A diffusers text-to-image pipeline as a renderfs `exec` program (an
example: it needs torch and diffusers, and the model's weights in a local
directory; nothing is downloaded).

usage (in a models file, see contrib/models/local-examples.json):
  ["/usr/bin/python3", "/path/to/diffusers_t2i.py", "/opt/models/sdxl-turbo"]

Reads {"prompt", "negative_prompt", "seed", "width", "height", "steps",
"guidance"} on stdin, writes a PNG to $RENDERFS_OUTPUT, reports each
denoising step as progress on $RENDERFS_STATUS_FD. On a GPU route renderfs
sets CUDA_VISIBLE_DEVICES to the worker's device, so "cuda" is that one.
"""
import json
import os
import sys


def main():
    model_dir = sys.argv[1]
    req = json.load(sys.stdin)
    status = os.fdopen(int(os.environ["RENDERFS_STATUS_FD"]), "w", buffering=1)
    import torch
    from diffusers import AutoPipelineForText2Image

    cuda = torch.cuda.is_available()
    pipe = AutoPipelineForText2Image.from_pretrained(
        model_dir, local_files_only=True, torch_dtype=torch.float16 if cuda else torch.float32)
    pipe = pipe.to("cuda" if cuda else "cpu")
    steps = int(req.get("steps", 4))
    status.write(f"log {os.path.basename(model_dir)} on {'cuda' if cuda else 'cpu'}, "
                 f"{steps} steps\n")

    def on_step(pipeline, step, timestep, kwargs):
        status.write(f"progress {(step + 1) / steps:.3f}\n")
        return kwargs

    image = pipe(prompt=req["prompt"], negative_prompt=req.get("negative_prompt"),
                 num_inference_steps=steps, guidance_scale=float(req.get("guidance", 0.0)),
                 width=int(req.get("width", 512)), height=int(req.get("height", 512)),
                 generator=torch.Generator("cpu").manual_seed(int(req.get("seed", 0))),
                 callback_on_step_end=on_step).images[0]
    image.save(os.environ["RENDERFS_OUTPUT"], format="PNG")


if __name__ == "__main__":
    main()
