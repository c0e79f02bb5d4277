"""Learners: how a task trains inside a Ray Train worker, chosen by the task spec's ``learner`` kind.

``supervised`` trains one model on (image, target) batches; ``dino`` trains a student on all
multi-crop views against an EMA teacher on the global ones. Each learner also says how its run is
evaluated and whether it exports a model package.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from pathray.models.config import EngineConfig
from pathray.models.tasks import TaskSpec
from pathray.registry import LEARNERS
from pathray.storage import StorageConfig
from pathray.training.config import OptimConfig, ProjectConfig, RunSection, ScaleConfig, TrainConfig
from pathray.training.parallel import is_sharded, load_model_state, model_state, wrap_model

if TYPE_CHECKING:
    from pathray.training.evaluate import EvalTiles


@dataclass(frozen=True)
class WorkerJob:
    """What every Ray Train worker receives: the sections it trains with.

    Pickled to the workers, ``storage`` loses any literal credentials on the way; the workers read
    them from the environment (``StorageConfig.key_env``/``secret_env``).
    """

    engine: EngineConfig
    task: TaskSpec
    optim: OptimConfig
    scale: ScaleConfig
    train: TrainConfig
    run: RunSection
    storage: StorageConfig

    @classmethod
    def from_project(cls, project: ProjectConfig) -> WorkerJob:
        """The sections of ``project`` a worker trains with (its task as a spec)."""
        p = project
        return cls(p.engine, p.task_spec(), p.optim, p.scale, p.train, p.run, p.storage)

    def record(self) -> dict[str, Any]:
        """The sections as JSON-able values, saved with every checkpoint (no credentials)."""
        sections = ("engine", "optim", "scale", "train", "run", "storage")
        out = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return {**out, "task": self.task.config.model_dump(mode="json")}


class Learner(Protocol):
    """What the training loop calls, step by step."""

    exports_package: ClassVar[bool]
    validates: ClassVar[bool]  # scores fixed held-out tiles at checkpoints (and every eval_every steps)
    selects_checkpoint: ClassVar[bool]  # the checkpoint with the best val score is the one kept
    val_prefix: ClassVar[str]  # what its val scores are recorded under: "val/", "ssl/"
    model: nn.Module
    trainable: nn.Module
    task: TaskSpec

    def prepare(self, strategy: str) -> None: ...
    def loss(self, batch: dict[str, Any], progress: float) -> tuple[torch.Tensor, Any]: ...
    def before_step(self, step: int) -> None: ...
    def after_step(self, progress: float) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def load(self, saved: dict[str, Any]) -> None: ...
    def validate(self, batches: list[dict[str, Any]], device: torch.device) -> dict[str, float]: ...

    @staticmethod
    def evaluate(
        engine: EngineConfig, task: TaskSpec, checkpoint: Path, tiles: EvalTiles
    ) -> dict[str, float]:
        """Scores of the run's final checkpoint (empty when there is nothing to score on)."""
        ...

    @staticmethod
    def val_tiles(task: TaskSpec) -> tuple[TaskSpec, str, bool]:
        """The task whose targets the val tiles carry, the sampler that draws them, and whether they
        are probe labels of a self-supervised run (held out on any annotated slide)."""
        ...

    @staticmethod
    def packaged(engine: EngineConfig, task: TaskSpec, checkpoint: Path) -> tuple[nn.Module, Any]:
        """The module a run's checkpoint exports as a model package, and the package's task config."""
        ...


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (FSDP2 modules are their own)."""
    return getattr(model, "module", model)


def detach(outputs: Any) -> Any:
    """Model outputs without their graph, as float (tensors inside dicts and sequences too)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float()
    if isinstance(outputs, dict):
        return {k: detach(v) for k, v in outputs.items()}
    if isinstance(outputs, list | tuple):
        return type(outputs)(detach(v) for v in outputs)
    return outputs


def build_learner(job: WorkerJob) -> Learner:
    """The learner the job's task trains with (``TaskSpec.learner``)."""
    return LEARNERS.get(job.task.learner)(job.engine, job.task)


@LEARNERS.register("supervised")
class SupervisedLearner:
    """Segmentation, classification, detection, instance: one model, one loss; exports a package."""

    exports_package = True
    validates = True
    selects_checkpoint = True
    val_prefix = "val/"

    def __init__(self, engine: EngineConfig, task: TaskSpec) -> None:
        from pathray.models.task_model import build_model

        self.model, self.task = build_model(engine, task)
        self.trainable: nn.Module = self.model

    def prepare(self, strategy: str) -> None:
        self.trainable = wrap_model(self.model, strategy)

    def loss(self, batch: dict[str, Any], progress: float) -> tuple[torch.Tensor, Any]:
        outputs = self.trainable(batch["image"])
        return self.task.loss(outputs, batch, progress=progress), outputs

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, progress: float) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"model": model_state(self.trainable)}

    def load(self, saved: dict[str, Any]) -> None:
        load_model_state(self.trainable, saved["model"])

    def validate(self, batches: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
        """The task's metrics on fixed val batches, the model in eval mode (a sharded model's forward
        is a collective: every rank calls this then)."""
        model = unwrap(self.trainable)
        metric = self.task.metrics()
        model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    metric.update(detach(model(batch["image"])), batch)
        finally:
            model.train()
        return {k: float(v) for k, v in metric.compute().items()}

    @staticmethod
    def evaluate(
        engine: EngineConfig, task: TaskSpec, checkpoint: Path, tiles: EvalTiles
    ) -> dict[str, float]:
        """Task metrics on the held-out split's tiles, beside a constant predictor's."""
        from pathray.training.evaluate import evaluate_supervised

        if tiles.split is None or not (tiles.manifest["split"] == tiles.split).any():
            return {}
        return evaluate_supervised(engine, task, checkpoint, tiles)

    @staticmethod
    def val_tiles(task: TaskSpec) -> tuple[TaskSpec, str, bool]:
        return task, "random_tissue", False

    @staticmethod
    def packaged(engine: EngineConfig, task: TaskSpec, checkpoint: Path) -> tuple[nn.Module, Any]:
        """The task model, strictly loaded."""
        from pathray.training.evaluate import load_trained

        model, _ = load_trained(engine, task, checkpoint)
        return model, task.config


@LEARNERS.register("dino")
class DinoLearner:
    """Self-supervised DINO: a student trained on all views, an EMA teacher on the global ones.

    Its checkpoint's ``teacher`` entry is the teacher backbone, which ``engine.weights`` of a
    fine-tuning project loads; the run exports it as an ``embedding`` model package. At checkpoints
    (and every ``train.eval_every`` steps) the teacher is watched on fixed held-out tiles: RankMe,
    ODCorr, a kNN and a linear probe (``ssl/...`` in the history).
    """

    exports_package = True
    validates = True
    selects_checkpoint = False  # an SSL run keeps its last checkpoint
    val_prefix = "ssl/"

    def __init__(self, engine: EngineConfig, task: TaskSpec) -> None:
        from pathray.models.dino import DinoModel, make_teacher
        from pathray.models.engines import build_engine

        backbone = build_engine(engine)
        self.task = task
        self.model: nn.Module = DinoModel(
            backbone, task.build_head(backbone.embed_dim, backbone.dense_channels)
        )
        self.teacher = make_teacher(self.model)
        self.trainable: nn.Module = self.model

    def prepare(self, strategy: str) -> None:
        import ray.train.torch

        # DINO uses the pooled embedding only: the dense decoder gets no gradient.
        self.trainable = wrap_model(self.model, strategy, {"find_unused_parameters": True})
        if is_sharded(self.trainable):  # the teacher is sharded alike, so the EMA runs shard by shard
            self.teacher = wrap_model(self.teacher, strategy)
        self.teacher.to(ray.train.torch.get_device())

    def loss(self, batch: dict[str, Any], progress: float) -> tuple[torch.Tensor, Any]:
        from pathray.models.dino import dino_forward, views_from_batch

        engine = unwrap(self.trainable).engine
        global_views, local_views = views_from_batch(batch, engine.normalize)
        outputs = dino_forward(self.trainable, self.teacher, global_views, local_views)
        return self.task.loss(outputs, batch, progress=progress), outputs

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, progress: float) -> None:
        from pathray.models.dino import update_teacher

        for model in (self.trainable, self.teacher):
            if is_sharded(model):  # a root FSDP module keeps its parameters gathered after forward
                model.reshard()
        update_teacher(self.trainable, self.teacher, self.task.teacher_momentum(progress))  # type: ignore[attr-defined]

    def state(self) -> dict[str, Any]:
        teacher = model_state(self.teacher)
        prefix = "engine.backbone."
        backbone = {k.removeprefix("engine."): v for k, v in teacher.items() if k.startswith(prefix)}
        return {
            "model": model_state(self.trainable),
            "teacher_model": teacher,
            "teacher": backbone,  # what `engine.weights` loads into a foundation engine
            "task": self.task_state(),
        }

    def task_state(self) -> dict[str, Any]:
        return self.task.state_dict()

    def load_task_state(self, state: dict[str, Any]) -> None:
        self.task.load_state_dict(state)

    def load(self, saved: dict[str, Any]) -> None:
        load_model_state(self.trainable, saved["model"])
        load_model_state(self.teacher, saved["teacher_model"])
        self.load_task_state(saved["task"])

    def validate(self, batches: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
        """RankMe, ODCorr, kNN and linear probe accuracy of the teacher on the fixed held-out tiles."""
        from pathray.models.metrics import ssl_scores
        from pathray.training.evaluate import embed_batches

        sharded = is_sharded(self.teacher)
        if sharded:  # the engine is called directly, not through the root: gather the root's own parameters
            self.teacher.unshard()
        try:
            x, y, slides = embed_batches(unwrap(self.teacher).engine, batches, device)
        finally:
            if sharded:
                self.teacher.reshard()
        return ssl_scores(x, y, slides) if len(x) > 1 else {}

    @staticmethod
    def evaluate(
        engine: EngineConfig, task: TaskSpec, checkpoint: Path, tiles: EvalTiles
    ) -> dict[str, float]:
        """RankMe, ODCorr and a linear probe of the teacher, on tiles of every slide."""
        from pathray.training.evaluate import evaluate_ssl

        return evaluate_ssl(engine, task, checkpoint, replace(tiles, split=None))

    @staticmethod
    def val_tiles(task: TaskSpec) -> tuple[TaskSpec, str, bool]:
        """Class-balanced tiles labelled with the annotated class they were drawn from."""
        from pathray.models.tasks import ClassificationConfig, build_task

        return build_task(ClassificationConfig()), "class_balanced", True

    @staticmethod
    def packaged(engine: EngineConfig, task: TaskSpec, checkpoint: Path) -> tuple[nn.Module, Any]:
        """The teacher backbone as an ``embedding`` model (its pooled embedding is the output)."""
        from pathray.models.foundation import random_init_expected
        from pathray.models.task_model import build_model
        from pathray.models.tasks import EmbeddingConfig
        from pathray.training.evaluate import CHECKPOINT_FILE

        with random_init_expected():
            model, _ = build_model(engine.model_copy(update={"weights": None}), EmbeddingConfig())
        model.engine.load_backbone_weights(str(checkpoint / CHECKPOINT_FILE))
        return model.eval(), EmbeddingConfig()


@LEARNERS.register("dinov2")
class DinoV2Learner(DinoLearner):
    """DINOv2: DINO on class tokens, iBOT on block-masked patches of the global crops, KoLeo or KDE,
    Sinkhorn–Knopp or mean centring; the heads' last layers frozen for the first steps."""

    def __init__(self, engine: EngineConfig, task: TaskSpec) -> None:
        import numpy as np

        from pathray.models.dino import DinoHead, make_teacher
        from pathray.models.dinov2_model import DinoV2Model, DinoV2Objective
        from pathray.models.engines import build_engine

        backbone = build_engine(engine)
        c = self.config = task.config  # type: ignore[assignment]
        self.task = task
        width = int(getattr(getattr(backbone, "backbone", None), "num_features", backbone.embed_dim))
        head = DinoHead(width, c.out_dim, c.head_hidden, c.head_bottleneck)
        ibot = (
            DinoHead(width, c.ibot_out_dim, c.head_hidden, c.head_bottleneck)
            if c.ibot_separate_head
            else None
        )
        self.model = DinoV2Model(backbone, head, ibot)
        self.teacher = make_teacher(self.model)
        self.trainable = self.model
        self.objective = DinoV2Objective(c)
        self.rng = np.random.default_rng(torch.initial_seed())  # block masks: seeded as the weights are
        self.last_layers = [m.last_layer for m in (head, ibot) if m is not None]

    def loss(self, batch: dict[str, Any], progress: float) -> tuple[torch.Tensor, Any]:
        from pathray.models.dino import teacher_temperature, views_from_batch
        from pathray.models.dinov2_model import step_masks

        engine = unwrap(self.trainable).engine
        global_views, local_views = views_from_batch(batch, engine.normalize)
        glob = torch.cat(global_views)
        local = torch.cat(local_views) if local_views else None
        patch = engine.patch_size
        grid = (glob.shape[-2] // patch[0], glob.shape[-1] // patch[1])
        masks = step_masks(len(glob), grid, self.config, self.rng, glob.device)
        with torch.no_grad():
            target = self.teacher(glob, None, masks["masks"], apply_masks=False)
        student = self.trainable(glob, local, masks["masks"])
        temp = teacher_temperature(progress, self.config)
        losses = self.objective(student, target, masks, temp, len(global_views), len(local_views))
        first = target["cls"][: len(global_views[0])]
        outputs = {"embedding": first, "losses": {k: v.detach() for k, v in losses.items() if k != "loss"}}
        return losses["loss"], outputs

    def before_step(self, step: int) -> None:
        """The heads' last layers get no update while ``freeze_last_layer_steps`` lasts."""
        if step < self.config.freeze_last_layer_steps:
            for layer in self.last_layers:
                for p in layer.parameters():
                    p.grad = None

    def task_state(self) -> dict[str, Any]:
        return {k: v.detach().cpu().clone() for k, v in self.objective.state_dict().items()}

    def load_task_state(self, state: dict[str, Any]) -> None:
        self.objective.load_state_dict(state)


def fit_positions(learner: Learner, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (another run's checkpoint) with every position embedding whose grid differs from
    this learner's resampled to it: a run at another input size starts from it (``train.init_from``)."""
    from pathray.models.foundation import resample_pos_embed

    model = unwrap(learner.trainable)
    backbone = model.engine.backbone
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = dict(saved)
    for entry in ("model", "teacher_model"):
        if entry not in saved:
            continue
        state = dict(saved[entry])
        for key, value in saved[entry].items():
            if key.endswith("pos_embed") and key in own and tuple(value.shape) != own[key]:
                state[key] = resample_pos_embed(backbone, {"pos_embed": value}, source=key)["pos_embed"]
        out[entry] = state
    return out
