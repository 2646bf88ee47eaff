"""Settings: what configs/*.yaml and the RECAST_* environment may say (loaded by recast.tasks.settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from recast.tasks.schemas.fields import FrameCount, Strict

Dtype = Literal["float32", "bfloat16", "float16"]


class LoraSpec(Strict):
    source: str = Field(description="Hub repo id, local .safetensors file, or fsspec URI of a diffusers-format LoRA.")
    weight_name: str | None = Field(None, description="File inside a hub repo.")
    revision: str | None = Field(None, description="Pinned hub revision of the repo.")
    weight: float = Field(1.0, ge=-4.0, le=4.0, description="Adapter strength.")
    alpha: float | None = Field(None, gt=0, description="The LoRA's alpha when its file does not carry one (the "
                                "delta is scaled by alpha / rank); a file's own `.alpha` keys win.")


class ModelProfile(Strict):
    """An edit model profile (configs/profiles.yaml)."""

    name: str = Field(description="Profile name, as used by --profile.")
    description: str = Field("", description="What this profile is for.")
    model_id: str = Field(description="Hub id, local folder, or 'tiny' (random weights built locally) of the edit model.")
    revision: str | None = Field(None, description="Pinned hub revision (commit hash) of model_id.")
    dtype: Dtype = Field(description="torch dtype the pipeline runs in.")
    device: str = Field(description="torch device: cpu, cuda, cuda:1, ...")
    output_area: int = Field(ge=64 * 64, le=4096 * 4096, description="Output pixels when width/height are unset.")
    vae_image_area: int = Field(ge=64 * 64, le=4096 * 4096, description="Pixels each input is resized to for the VAE.")
    handoff_area: int = Field(ge=32 * 32, le=1920 * 1088, description="Pixels of the frame handed to video.")
    usd_per_gpu_hour: float | None = Field(None, ge=0, description="Overrides the global GPU price.")
    memory_gib: float | None = Field(None, ge=0, description="Peak device memory this profile needs (measured; "
                                     "the memory policy makes room for it).")
    # Defaults this profile imposes on requests that leave them unset (e.g. Lightning: 4 steps, CFG off).
    steps: int | None = Field(None, ge=1, le=100, description="Default steps for this profile.")
    true_cfg_scale: float | None = Field(None, ge=1.0, le=20.0, description="Default CFG for this profile.")
    # Speed and memory (see docs/PERFORMANCE.md).
    attention_backend: str | None = Field(None, description="diffusers attention backend, e.g. _native_cudnn, _flash_3 "
                                          "(FlashAttention-3 in bf16, Hopper), sage, fa3-fp8 (FlashAttention-3's FP8 "
                                          "forward), or auto (the fastest SDPA kernel, timed at load), or a "
                                          "preference list (_flash_3,sage: the first this machine can run); falls "
                                          "back to native SDPA with a warning where none is usable.")
    compile: bool = Field(False, description="torch.compile the transformer's repeated blocks.")
    compile_ahead_of_time: bool = Field(True, description="With compile: the repeated blocks compile once, ahead of "
                                        "time, into code kept beside the prepared weights, which a restart loads "
                                        "without tracing; false (or a GPU team): torch.compile in the process.")
    compile_autotune: bool = Field(False, description="With compile: inductor's max-autotune for the blocks (its "
                                   "GEMM templates, FP8 ones included, with the work around them fused in, timed "
                                   "against cuBLAS at the first compile: minutes more on a new node; the compiled "
                                   "code is kept as without).")
    quantize: Literal["none", "fp8", "int4"] = Field("none", description="Transformer block linears precision.")
    quantize_text_encoder: bool = Field(False, description="Apply `quantize` to the text encoder's LLM too.")
    offload_text_encoder: bool = Field(False, description="Keep the text encoder in CPU RAM, stream it per call.")
    lightning: LoraSpec | None = Field(None, description="Few-step distillation LoRA fused at load.")
    scheduler: dict | None = Field(None, description="Scheduler config overrides (the Lightning LoRA needs its own).")
    warmup: bool = Field(False, description="Run (and compile) a few edits at load, before taking work.")
    prepare: bool = Field(True, description="Keep the recipe's weights prepared (LoRA fused, quantized) in the model "
                          "cache at the first start, and load them at every later one (`recast prepare`).")


class VideoProfile(Strict):
    """An image-to-video profile (configs/video_profiles.yaml)."""

    name: str = Field(description="Video profile name, as used by --video-profile.")
    description: str = ""
    model_id: str = Field(description="Hub id, local folder, or tiny-wan22 / tiny-wan21 (built locally).")
    revision: str | None = Field(None, description="Pinned hub revision (commit hash).")
    dtype: Dtype
    device: str
    area: int = Field(ge=16 * 16, le=1920 * 1088, description="Frame pixels when no size is given (480p: 832x480).")
    steps: int | None = Field(None, ge=1, le=100, description="Default steps for this profile.")
    guidance_scale: float | None = Field(None, ge=1.0, le=20.0, description="Default CFG for this profile.")
    max_sequence_length: int = Field(512, ge=16, le=512, description="Text tokens for the UMT5 encoder.")
    usd_per_gpu_hour: float | None = Field(None, ge=0)
    memory_gib: float | None = Field(None, ge=0, description="Peak device memory this profile needs (measured).")
    # The recipe (see docs/PERFORMANCE.md).
    quantize: Literal["none", "fp8"] = Field("none", description="Precision of both experts' block linears.")
    quantize_text_encoder: bool = Field(False, description="Apply `quantize` to the UMT5 encoder too.")
    offload: Literal["none", "stream"] = Field(
        "none", description="stream: keep every block in pinned CPU RAM and stream it to the card as it runs.")
    attention_backend: str | None = Field(None, description="diffusers attention backend for both experts, e.g. "
                                          "_native_cudnn, sage or fa3-fp8, or a preference list (fa3-fp8,sage: the "
                                          "first this machine can run); falls back to native SDPA with a warning "
                                          "where none is usable.")
    compile: bool = Field(False, description="torch.compile each expert's repeated blocks.")
    compile_ahead_of_time: bool = Field(True, description="With compile: the repeated blocks compile once, ahead of "
                                        "time, into code kept beside the prepared weights, which a restart loads "
                                        "without tracing; false (or a GPU team): torch.compile in the process.")
    compile_autotune: bool = Field(False, description="With compile: inductor's max-autotune for the blocks (its "
                                   "GEMM templates, FP8 ones included, with the work around them fused in, timed "
                                   "against cuBLAS at the first compile: minutes more on a new node; the compiled "
                                   "code is kept as without).")
    compile_dynamic: bool = Field(True, description="With compile: the blocks take dynamic shapes, so one compile "
                                  "serves every frame count and size and the warm-up is a short clip; false: they "
                                  "are compiled for one shape and the warm-up renders a whole 81-frame clip.")
    vae_fused_norms: bool = Field(False, description="On a CUDA card: each of the VAE's RMS norms, with the SiLU "
                                  "after it, runs as one Triton kernel instead of seven memory-bound passes "
                                  "(recast.tasks.models.fused_norms); elsewhere, or without Triton, diffusers' own "
                                  "norms run, with a warning.")
    warmup: bool = Field(False, description="Run (and compile) a short clip at load, before taking work.")
    prepare: bool = Field(True, description="Keep the recipe's weights prepared (LoRA fused, FP8) in the model "
                          "cache at the first start, and load them at every later one (`recast prepare`).")
    lightning: LoraSpec | None = Field(None, description="Distillation LoRA fused into the (high-noise) expert.")
    lightning_2: LoraSpec | None = Field(None, description="Distillation LoRA fused into the low-noise expert.")
    scheduler: dict | None = Field(None, description="{type: euler|unipc, shift, sigmas}: explicit sigmas fix "
                                   "the schedule (distilled recipes).")

    @model_validator(mode="after")
    def _fixed_schedule_fixes_steps(self) -> VideoProfile:
        sigmas = (self.scheduler or {}).get("sigmas")
        if sigmas and self.steps not in (None, len(sigmas)):
            raise ValueError(f"steps={self.steps} but the scheduler's fixed sigmas give {len(sigmas)} steps")
        return self


class AnimateDefaults(Strict):
    steps: int = Field(40, ge=1, le=100)
    guidance_scale: float = Field(5.0, ge=1.0, le=20.0)
    negative_prompt: str = ""


class EditDefaults(Strict):
    steps: int = Field(8, ge=1, le=100)
    true_cfg_scale: float = Field(4.0, ge=1.0, le=20.0)
    negative_prompt: str = " "


class HandoffDefaults(Strict):
    motion_prompt: str = Field(min_length=1)
    num_frames: FrameCount = 81
    fps: int = Field(16, ge=4, le=60)
    mode: Literal["inline", "deployment", "none"] = Field(
        "inline", description="inline: animate in the same process; deployment: trigger the animate "
        "deployment (its own GPU pool); none: stop at handoff.json.")
    deployment: str = Field("recast-animate/animate", description="Deployment run in 'deployment' mode.")
    timeout_s: float = Field(3600, gt=0, description="How long the edit flow waits for a deployment run.")


def _pick(field: str, name: str, known: dict):
    from recast.tasks.errors import BadInput

    if name not in known:
        raise BadInput(field, name, "unknown profile", f"use one of: {', '.join(sorted(known))}")
    return known[name]


class Settings(Strict):
    profile: str
    video_profile: str
    cli_server: Literal["background", "temporary"] = Field(
        "background", description="Without PREFECT_API_URL, the Prefect server of CLI commands: background (one "
        "local server the commands share, started by the first, `recast server stop` stops it) or temporary (one "
        "per command, as Prefect does: seconds of start and stop around every command).")
    cli_server_idle_s: float = Field(1800, gt=0, description="The background server stops itself after this long "
                                     "without a command.")
    cli_worker_idle_s: float = Field(600, ge=0, description="After a CLI command ran its models in its own "
                                     "process, a background worker keeps them loaded for the next commands and stops "
                                     "after this long without a job (`recast server stop` stops it too); 0: off.")
    worker_idle_s: float = Field(0, ge=0, description="A `recast worker` stops itself after this long without a "
                                 "job; 0: never (the CLI's background worker gets cli_worker_idle_s).")
    execution: Literal["local", "workers"] = Field(
        "local", description="local: GPU tasks run in the flow's process; workers: on `recast worker` processes. "
        "A CLI command with RECAST_EXECUTION unset runs on workers already serving every model it needs.")
    edit_timeout_s: float = Field(900, gt=0, description="Longest an edit may *run* on a worker (queueing does "
                                  "not count) before it is given up and submitted again.")
    animate_timeout_s: float = Field(3600, gt=0, description="The same for one clip.")
    worker_heartbeat_s: float = Field(5, gt=0, description="How often a job on a worker writes its heartbeat.")
    worker_heartbeat_timeout_s: float = Field(30, gt=0, description="A running job whose worker has not beaten for "
                                              "this long is taken for lost (the worker died) and submitted again.")
    worker_poll_s: float = Field(2, gt=0, le=60, description="How often a run waiting on task workers asks the "
                                 "Prefect server about its jobs (their states; their heartbeats): every waiting run "
                                 "asks the one server. Their result files are read every 0.05 s regardless (0.5 s "
                                 "in a bucket).")
    worker_take_next: Literal["after_gpu", "on_gpu"] = Field(
        "after_gpu", description="When a task worker takes its next job: after_gpu, once the current one has left "
        "the GPU (its CPU work overlaps the next model call); on_gpu, once it holds the GPU (the next job's delivery "
        "and set-up overlap its model call too, and wait for the GPU).")
    worker_respawns: int = Field(3, ge=0, le=100, description="A `recast worker` (one GPU) is a parent that imports "
        "the libraries once and a serving process it starts from them, again after it dies (a CUDA fault, the OOM "
        "killer): in seconds, without importing torch, diffusers and transformers again. It gives up (exits 1) after "
        "this many deaths within 10 minutes; 0: no parent, the worker is one process.")
    prepared_reads: Literal["shards", "blocks"] = Field(
        "blocks", description="How a start reads prepared weights to the card: blocks, 64-MiB blocks through 1 GiB "
        "of pinned buffers, each block's copy overlapping the next block's read; shards, each whole into one of a few "
        "pinned buffers of a shard's size (4 GiB of pinned host memory). Side by side on one H100 (the fp8 worker): "
        "blocks 24.7 s and 3.1 GiB host RSS on a restart, 9.9 s and 2.9 GiB respawned; shards 25.6 s / 6.1 GiB and "
        "11.7 s / 5.9 GiB.")
    start_readahead: bool = Field(
        True, description="At a worker's start, before its imports, ask the kernel to read on 16 threads the parts of "
        "the libraries and modules that the last start read (listed in the model cache's start-files.json by every "
        "start and by `recast prepare`): a new node's empty page cache then costs its imports one parallel read "
        "instead of a page fault at a time. Nothing is read when the list is missing or another environment's.")
    worker_resubmits: int = Field(2, ge=0, le=10, description="Resubmissions of a lost or timed-out job.")
    worker_in_flight: int = Field(8, ge=1, le=256, description="Jobs of one run submitted to task workers at once.")
    worker_wait_timeout_s: float = Field(600, gt=0, description="A job no worker has taken after this long fails, "
                                         "saying no running worker serves its profile.")
    batch_in_flight: int = Field(4, ge=1, le=64, description="Photos a batch run edits at once on task workers (each "
                                 "fans out its own edits); in local mode one at a time.")
    allowed_input_roots: list[str] = Field(
        default_factory=list, description="Where runs triggered from the UI or a schedule may read inputs "
        "(besides the storage roots).")
    storage_root: str
    signed_thumbnails_s: int = Field(0, ge=0, le=7 * 24 * 3600, description="On s3/gs storage, show each run's "
                                     "pictures in its Prefect UI summary through addresses signed for this many "
                                     "seconds (0: never; anyone who has such an address sees the picture)")
    gallery_url: str | None = Field(None, description="Address of `recast gallery` (e.g. http://127.0.0.1:4300): "
                                    "each run's summary in the Prefect UI links to its page there.")
    extra_storage_roots: list[str] = Field(
        default_factory=list, description="Other roots a run from the UI or a schedule may choose as its "
        "storage_root (it may never name one that is not configured).")
    max_clip_pixels: int = Field(1280 * 720, ge=16 * 16, description="Largest frame (width x height) a clip may have, "
                                 "however its size is given.")
    edit: EditDefaults
    animate: AnimateDefaults
    handoff: HandoffDefaults
    usd_per_gpu_hour: float = Field(ge=0)
    max_input_pixels: int = Field(ge=64 * 64)
    device_memory_gib: dict[str, float] = Field(
        default_factory=dict, description="Memory the policy may fill per device (e.g. {cuda: 70}); unset: what "
        "the card reports free.")
    profiles: dict[str, ModelProfile]
    video_profiles: dict[str, VideoProfile]

    @model_validator(mode="after")
    def _known_profile(self) -> Settings:
        if self.profile not in self.profiles:
            raise ValueError(f"profile={self.profile!r} is not defined; known: {sorted(self.profiles)}")
        if self.video_profile not in self.video_profiles:
            raise ValueError(f"video_profile={self.video_profile!r} is not defined; known: {sorted(self.video_profiles)}")
        return self

    def get_profile(self, name: str | None) -> ModelProfile:
        return _pick("profile", name or self.profile, self.profiles)

    def get_video_profile(self, name: str | None) -> VideoProfile:
        return _pick("video_profile", name or self.video_profile, self.video_profiles)

    def gallery_link(self, folder: str, path: str | None = None) -> str | None:
        """The gallery's address of a run folder (its page) or of a file in it; None without gallery_url."""
        if not self.gallery_url:
            return None
        from recast.tasks import storage

        parent, run_id = folder.rstrip("/").rsplit("/", 1)
        root = next((index for index, configured in enumerate(self.storage_roots)
                     if storage.same_location(storage.join(storage.normalize_uri(configured), "runs"), parent)), None)
        if root is None:
            return None
        base = self.gallery_url.rstrip("/")
        return f"{base}/runs/{root}/{run_id}" if path is None else f"{base}/files/{root}/{run_id}/{path}"

    @property
    def storage_roots(self) -> list[str]:
        """Where runs may write: the configured storage root and the extra ones."""
        return [self.storage_root, *self.extra_storage_roots]

    @property
    def input_roots(self) -> list[str]:
        """Where runs from the UI, the API or a schedule may read."""
        return [*self.storage_roots, *self.allowed_input_roots]
