"""Launch `recycler finetune` on however many GPUs this machine (or these machines) have.

Flows on the GPU pool call `run_finetune`; the argv is built by the pure `accelerate_command`, so the
launch layout (1 GPU, 8 GPUs with FSDP, 2 nodes x 8 GPUs) is unit-tested without a GPU. The accelerate
configs live in infra/accelerate/ (copied to /opt/recycler/accelerate in the GPU image; set
RECYCLER_ACCELERATE_CONFIGS to use another folder).

Why the layout flags are passed on the command line *and* a config file is always given: the file says
how to shard (FSDP, wrap policy, checkpointing), the flags say how many processes; and an explicit file
keeps a stray ~/.cache/huggingface/accelerate/default_config.yaml on the host out of the launch.
`--multi_gpu` is deliberately never combined with an FSDP file: in accelerate 1.15 that flag makes
`accelerate launch` ignore the file's `distributed_type: FSDP` and silently run plain DDP.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ENTRY_MODULE = "recycler.cli.train"
DEFAULT_PORT = 29500
CONFIG_DIR = Path(
    os.environ.get(
        "RECYCLER_ACCELERATE_CONFIGS", Path(__file__).resolve().parents[3] / "infra" / "accelerate"
    )
)
SINGLE_GPU, ONE_NODE, MULTI_NODE = "single-gpu.yaml", "fsdp-1node-8gpu.yaml", "fsdp-2node-8gpu.yaml"


def default_config_file(gpus_per_node: int, nodes: int = 1, config_dir: Path = CONFIG_DIR) -> Path:
    """The accelerate config for a layout: one GPU -> plain bf16, several -> FSDP (one node or many)."""
    if nodes > 1:
        return config_dir / MULTI_NODE
    return config_dir / (SINGLE_GPU if gpus_per_node == 1 else ONE_NODE)


def accelerate_command(
    gpus_per_node: int,
    nodes: int = 1,
    node_rank: int = 0,
    main_ip: str | None = None,
    main_port: int = DEFAULT_PORT,
    config_file: Path | None = None,
    *,
    finetune_args: Sequence[str],
) -> list[str]:
    """argv of `accelerate launch ... -m recycler.cli.train finetune FINETUNE_ARGS` for this layout.

    `finetune_args` are the arguments of `recycler finetune` (MODEL --data ... -o ...). Every node of a
    multi-node run executes the same command except for `node_rank`; rank 0's address is `main_ip`.
    Raises ValueError for a layout accelerate would reject later (and less clearly).
    """
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1 (got {gpus_per_node}); with no GPU use run_finetune")
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise ValueError(f"node_rank must be in [0, {nodes}) for {nodes} node(s), got {node_rank}")
    if nodes > 1 and not main_ip:
        raise ValueError("a multi-node launch needs main_ip, the address of node 0 reachable from every node")
    config = config_file if config_file is not None else default_config_file(gpus_per_node, nodes)
    argv = ["accelerate", "launch", "--config_file", str(config)]
    argv += ["--num_machines", str(nodes), "--num_processes", str(gpus_per_node * nodes)]
    argv += ["--mixed_precision", "bf16"]
    if nodes > 1:
        argv += ["--machine_rank", str(node_rank), "--main_process_ip", str(main_ip)]
        argv += ["--main_process_port", str(main_port)]
    return [*argv, "-m", ENTRY_MODULE, "finetune", *finetune_args]


def single_process_command(finetune_args: Sequence[str]) -> list[str]:
    """argv of one plain process (no accelerate launcher): CPU-only hosts and tests."""
    return [sys.executable, "-m", ENTRY_MODULE, "finetune", *finetune_args]


def detect_gpus() -> int:
    """CUDA devices visible to this process (respects CUDA_VISIBLE_DEVICES); 0 on CPU-only hosts.

    torch is imported here, not at module load, so flows can import the launcher without the GPU stack.
    """
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_finetune(
    finetune_args: Sequence[str],
    *,
    gpus_per_node: int | None = None,
    nodes: int = 1,
    node_rank: int = 0,
    main_ip: str | None = None,
    main_port: int = DEFAULT_PORT,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `recycler finetune` in a child process and wait; raises CalledProcessError on failure.

    A child process even for one CPU process: accelerate keeps process-wide state (PartialState), so a
    long-lived worker that trained in-process would carry it into the next run. With 0 GPUs the child
    is a plain `python -m recycler.cli.train finetune ...`; otherwise `accelerate launch` from this
    interpreter's environment. The child's exit code follows recycler's error codes (2-7, see README).
    """
    gpus = detect_gpus() if gpus_per_node is None else gpus_per_node
    if gpus == 0:
        argv = single_process_command(finetune_args)
    else:
        argv = accelerate_command(
            gpus, nodes, node_rank, main_ip, main_port, config_file, finetune_args=finetune_args
        )
        argv = [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    child_env = {**os.environ, **(env or {})}
    return subprocess.run(argv, env=child_env, check=True)
