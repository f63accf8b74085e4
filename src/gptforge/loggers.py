"""Experiment loggers beside OUT/metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

`--logger csv,tensorboard,wandb,mlflow` (any subset). csv is OUT/metrics.jsonl, always written;
each other logger goes through its own library, an optional extra (`pip install
'gptforge[tensorboard]'`, `[wandb]`, `[mlflow]`), asked for only when named. Every record the run
logs goes to each: a step's loss, lr, grad norm, tokens/s as `train/...`; an evaluation's losses,
perplexity and accuracies as `eval/...` (its sample text as text); the run's config once, at the start.

Where they write: TensorBoard's event files in OUT/tensorboard; wandb's run folder under OUT/wandb
(`WANDB_MODE=offline` keeps it local; WANDB_PROJECT names the project, default gptforge); MLflow's
tracking server from MLFLOW_TRACKING_URI, else a local store: OUT/mlflow.db (SQLite, MLflow's
local backend now that its file store is retired) and OUT/mlartifacts (experiment from
MLFLOW_EXPERIMENT_NAME, default gptforge). The run is named after OUT's folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .errors import GptforgeError
from .metrics import Metrics

# logger -> (the module it imports, the extra that installs it)
LOGGERS = {"csv": (None, None), "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
           "mlflow": ("mlflow", "mlflow")}


def parse_loggers(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The loggers a `--logger` value names ('csv,tensorboard'), csv always first; an unknown
    name, or a named library that is not installed, is a GptforgeError naming the extra."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen = ["csv"]
    for name in (n.strip().lower() for n in names):
        if not name or name in chosen:
            continue
        if name not in LOGGERS:
            raise GptforgeError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)} (comma-separated)")
        module, extra = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise GptforgeError(f"--logger {name} needs the {module} library: pip install 'gptforge[{extra}]'")
        chosen.append(name)
    return tuple(chosen)


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _texts(record: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in record.items() if k != "kind" and isinstance(v, str)}


class TensorBoardLogger:
    """Scalars and texts in OUT/tensorboard, through torch.utils.tensorboard's SummaryWriter."""

    def __init__(self, out: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind", "train"), record.get("step", 0)
        for key, value in _numbers(record).items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)
        for key, value in _texts(record).items():
            self.writer.add_text(f"{kind}/{key}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A wandb run (its folder under OUT/wandb); the config as the run's config."""

    def __init__(self, out: Path, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gptforge"), name=out.name,
                              dir=str(out), config=config, reinit="create_new")

    def log(self, record: dict[str, Any]) -> None:
        kind = record.get("kind", "train")
        values: dict[str, Any] = {f"{kind}/{k}": v for k, v in _numbers(record).items()}
        values.update({f"{kind}/{k}": v for k, v in _texts(record).items()})
        if values:
            self.run.log(values, step=int(record.get("step", 0)))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MLflowLogger:
    """An MLflow run: the config as params, numbers as metrics, texts as artifacts."""

    def __init__(self, out: Path, config: dict[str, Any]):
        import mlflow
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve() / MLFLOW_DB}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "gptforge")
        experiment = self.client.get_experiment_by_name(name)
        # artifacts (the sample texts) beside the database, not in the current directory
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=None if "MLFLOW_TRACKING_URI" in os.environ else (out.resolve() / "mlartifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        params = [Param(k, json.dumps(v, default=str)[:6000] if not isinstance(v, str) else v[:6000])
                  for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        kind, step = record.get("kind", "train"), int(record.get("step", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(f"{kind}/{k}", v, now, step) for k, v in _numbers(record).items() if math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        for key, value in _texts(record).items():
            self.client.log_text(self.run_id, value, f"{kind}/{key}/step_{step:07d}.txt")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


MLFLOW_DB = "mlflow.db"
_CLASSES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MLflowLogger}


class LoggedMetrics(Metrics):
    """OUT/metrics.jsonl and loss.png (`Metrics`), and every record also to the chosen loggers
    (rank 0 only). `close()` ends their runs."""

    def __init__(self, out: Path, keep_before_step: int | None, enabled: bool, loggers: str = "csv",
                 config: dict[str, Any] | None = None):
        super().__init__(out, keep_before_step, enabled)
        names = parse_loggers(loggers)
        self.loggers = [_CLASSES[n](out, dict(config or {})) for n in names if n != "csv"] if enabled else []

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
        for logger in self.loggers:
            logger.log(record)

    def plot(self, force: bool = False) -> None:
        super().plot(force)
        if force:
            for logger in self.loggers:
                logger.flush()

    def close(self) -> None:
        """End the loggers' runs (TensorBoard's files closed, wandb's run finished, MLflow's run ended)."""
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()
