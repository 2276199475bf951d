"""The evaluators of ``benchmarks.defaults``: one per benchmark teacher, each scoring teacher rows and
student checkpoints with that teacher's own domain feature net."""
from __future__ import annotations

import statistics
from pathlib import Path

from tdm_core import reference_grid
from training.config import DistillConfig

PREVIEW_SEED = 7  # the preview grids' noise (the scored rows use 1000 + sampling seed)


def summarise(per_seed: list[dict]) -> dict:
    """Mean and standard deviation over training runs of each metric (each run's own sampling spread dropped)."""
    out = {"runs": len(per_seed)}
    for key in (k for k in per_seed[0] if not k.endswith("_sd") and k != "seeds"):
        values = [r[key] for r in per_seed]
        out[key] = statistics.fmean(values)
        out[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _default_rank_alpha() -> tuple[int, float]:
    defaults = DistillConfig()
    return defaults.lora_rank, defaults.alpha()


def summarise_sampling_seeds(per_seed: list[dict]) -> dict:
    """One run's row: mean and standard deviation of each metric over its sampling seeds."""
    out = {}
    for key in per_seed[0]:
        values = [r[key] for r in per_seed]
        out[key] = statistics.fmean(values)
        out[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


class DigitsEvaluator:
    """The digits teacher's evaluator: FD in the digits classifier's features to the held-out digits and to the
    teacher's own 50-step samples (same CFG and noise), class accuracy; classes balanced, noise seed 1000 + seed."""

    def __init__(self, num_eval: int, seeds: tuple, cfg: float):
        from benchmarks import metrics, sampling
        from benchmarks.demo import TEACHER_DIR, load_teacher
        from benchmarks.digits_data import load_digits_split

        self.model_dir, self.cfg, self.seeds = TEACHER_DIR, cfg, seeds
        self.teacher = load_teacher(TEACHER_DIR)
        self.classifier = metrics.load_classifier()
        self.real_feats = metrics.classifier_outputs(self.classifier, load_digits_split("heldout")[0])[0]
        self.classes = sampling.balanced_classes(num_eval)
        self.num_eval = num_eval
        self._reference = {}

    def prompts_file(self, folder: Path) -> Path:
        path = folder / "prompts.txt"
        path.write_text("".join(f"{c}\n" for c in range(10)))
        return path

    def student_grid(self, k: int) -> list[int]:
        return reference_grid(k, DistillConfig().total_steps)

    def _noise(self, seed: int):
        from benchmarks import sampling

        return sampling.noise_for(self.teacher, self.num_eval, 1000 + seed)

    def _teacher_samples(self, steps: int, seed: int):
        from benchmarks import sampling

        if steps != 50:
            return sampling.sample_teacher(self.teacher, steps, self.classes, self._noise(seed), self.cfg)
        if seed not in self._reference:  # the reference of every row: sampled once per seed
            self._reference[seed] = sampling.sample_teacher(self.teacher, 50, self.classes, self._noise(seed), self.cfg)
        return self._reference[seed]

    def _score(self, make_samples) -> dict:
        from benchmarks import metrics

        per_seed = []
        for seed in self.seeds:
            reference = metrics.classifier_outputs(self.classifier, self._teacher_samples(50, seed))[0]
            per_seed.append(metrics.quality(self.classifier, make_samples(seed), self.classes, self.real_feats, reference))
        return summarise_sampling_seeds(per_seed)

    def teacher_row(self, steps: int) -> dict:
        return self._score(lambda seed: self._teacher_samples(steps, seed))

    def student_row(self, adapter_state: dict, grid: list[int]) -> dict:
        from benchmarks import sampling
        from benchmarks.demo import load_teacher

        student = load_teacher(self.model_dir)
        sampling.load_student_state(student, adapter_state, *_default_rank_alpha())
        return self._score(lambda seed: sampling.sample_student(student, grid, self.classes, self._noise(seed)))

    def preview(self, students: list[tuple[str, dict]], grid: list[int]) -> tuple[list[tuple[str, "torch.Tensor"]], list[str]]:
        """Rows of images in [0, 1] (teacher at 50 and 4 steps, then each student) for two samples per class,
        the same noise in every row; and the column labels."""
        import torch

        from benchmarks import sampling
        from benchmarks.demo import load_teacher

        teacher, student = self.teacher, load_teacher(self.model_dir)
        classes = torch.arange(20) % 10
        noise = sampling.noise_for(teacher, classes.shape[0], PREVIEW_SEED)
        rows = [(f"teacher DDIM {n} steps, CFG {self.cfg:g}", teacher.decode(sampling.sample_teacher(teacher, n, classes, noise, self.cfg)))
                for n in (50, 4)]
        rank, alpha = _default_rank_alpha()
        for label, state in students:
            sampling.load_student_state(student, state, rank, alpha)
            rows.append((label, student.decode(sampling.sample_student(student, grid, classes, noise))))
        return rows, [str(int(c)) for c in classes]


class ShapesEvaluator:
    """A text-to-image teacher of the shapes data (the shapes UNet teacher, the Flux-architecture flow teacher): FD in the shapes classifier's features to the held-out images and
    to the teacher's own 50-step samples, and the share of prompts whose every named attribute is drawn."""

    def __init__(self, num_eval: int, seeds: tuple, cfg: float, model_dir: Path | None = None):
        from benchmarks import text_metrics
        from benchmarks.text_sampling import balanced_prompts
        from benchmarks.train_text_teacher import DEFAULT_OUTPUT
        from training.models import load_family

        model_dir = DEFAULT_OUTPUT if model_dir is None else model_dir  # the flow teacher draws the same data
        self.model_dir, self.cfg, self.seeds, self.num_eval = model_dir, cfg, seeds, num_eval
        self.family = load_family(str(model_dir))
        self.classifier = text_metrics.load_classifier(train_if_missing=False)
        self.real_feats = text_metrics.real_heldout_features(self.classifier)
        self.prompts, self.labels = balanced_prompts(num_eval)
        self._reference = {}

    @staticmethod
    def captions() -> list[str]:
        from benchmarks.shapes_data import all_captions

        return all_captions()

    def prompts_file(self, folder: Path) -> Path:
        path = folder / "prompts.txt"
        path.write_text("".join(f"{c}\n" for c in self.captions()))
        return path

    def student_grid(self, k: int) -> list[int]:
        return reference_grid(k, DistillConfig().total_steps)

    def _noise(self, seed: int):
        from benchmarks.text_sampling import noise_for

        return noise_for(self.family, self.num_eval, 1000 + seed)

    def _teacher_samples(self, steps: int, seed: int):
        from benchmarks.text_sampling import sample_text_teacher

        if steps != 50:
            return sample_text_teacher(self.family, steps, self.prompts, self._noise(seed), self.cfg)
        if seed not in self._reference:
            self._reference[seed] = sample_text_teacher(self.family, 50, self.prompts, self._noise(seed), self.cfg)
        return self._reference[seed]

    def _score(self, make_samples) -> dict:
        from benchmarks import text_metrics

        per_seed = []
        for seed in self.seeds:
            reference = text_metrics.classifier_outputs(self.classifier, self._teacher_samples(50, seed))[0]
            row = text_metrics.quality(self.classifier, make_samples(seed), self.labels, self.real_feats, reference)
            per_seed.append({"fd_real": row["fd_real"], "fd_teacher": row["fd_teacher"], "accuracy": row["acc_all"]})
        return summarise_sampling_seeds(per_seed)

    def teacher_row(self, steps: int) -> dict:
        return self._score(lambda seed: self._teacher_samples(steps, seed))

    def student_row(self, adapter_state: dict, grid: list[int]) -> dict:
        from benchmarks.sampling import load_student_state
        from benchmarks.text_sampling import sample_text_student

        rank, alpha = _default_rank_alpha()
        load_student_state(self.family, adapter_state, rank, alpha)
        return self._score(lambda seed: sample_text_student(self.family, grid, self.prompts, self._noise(seed)))

    def preview(self, students: list[tuple[str, dict]], grid: list[int]) -> tuple[list[tuple[str, "torch.Tensor"]], list[str]]:
        """Rows of images in [0, 1] (teacher at 50 and 4 steps, then each student) for 12 fully specified
        captions, the same noise in every row; and the column labels."""
        from benchmarks.sampling import load_student_state
        from benchmarks.shapes_data import full_captions
        from benchmarks.text_sampling import noise_for, sample_text_student, sample_text_teacher

        prompts = full_captions()[::5][:12]
        noise = noise_for(self.family, len(prompts), PREVIEW_SEED)
        rows = [(f"teacher DDIM {n} steps, CFG {self.cfg:g}", sample_text_teacher(self.family, n, prompts, noise, self.cfg))
                for n in (50, 4)]
        rank, alpha = _default_rank_alpha()
        for label, state in students:
            load_student_state(self.family, state, rank, alpha)
            rows.append((label, sample_text_student(self.family, grid, prompts, noise)))
        labels = [p.removeprefix("a ").replace(" on the ", " ").replace(" at the ", " ") for p in prompts]
        return [(label, (images.clamp(-1, 1) + 1) / 2) for label, images in rows], labels


class VideoEvaluator(ShapesEvaluator):
    """The text-to-video teacher (a Wan-architecture ``WanPipeline`` on moving shapes, benchmarks/train_video_teacher.py),
    through the trainer's Wan family: per-frame FD in the shapes classifier's features to the held-out clips and to the
    teacher's own 50-step samples, the share of clips with colour, shape and motion direction right, and the temporal
    measures of :mod:`benchmarks.video_metrics` (track straightness, size constancy)."""

    def __init__(self, num_eval: int, seeds: tuple, cfg: float):
        from benchmarks import text_metrics, video_metrics
        from benchmarks.shapes_data import IMAGE_SIZE
        from benchmarks.train_video_teacher import DEFAULT_OUTPUT
        from benchmarks.video_data import NUM_FRAMES
        from training.models import load_family

        self.model_dir, self.cfg, self.seeds, self.num_eval = DEFAULT_OUTPUT, cfg, seeds, num_eval
        self.family = load_family(str(DEFAULT_OUTPUT))
        self.family.set_num_frames(NUM_FRAMES)  # the clips' shape (the family's defaults are the real Wan's 81 x 480)
        self.family.set_resolution(IMAGE_SIZE)
        self.family.resolution = IMAGE_SIZE
        self.classifier = text_metrics.load_classifier(train_if_missing=False)
        self.real_feats = video_metrics.real_heldout_features(self.classifier)
        self.prompts, self.labels = video_metrics.balanced_prompts(num_eval)
        self._reference = {}

    @staticmethod
    def captions() -> list[str]:
        from benchmarks.video_data import all_captions

        return all_captions()

    def _score(self, make_clips) -> dict:
        from benchmarks import text_metrics, video_metrics
        from benchmarks.metrics import frechet_distance
        from benchmarks.video_data import clips_to_frames

        per_seed = []
        for seed in self.seeds:
            clips = make_clips(seed)
            row = video_metrics.quality(self.classifier, clips, self.labels, self.real_feats)
            features = text_metrics.classifier_outputs(self.classifier, clips_to_frames(clips.float()))[0]
            reference = text_metrics.classifier_outputs(self.classifier, clips_to_frames(self._teacher_samples(50, seed).float()))[0]
            per_seed.append({"fd_real": row["fd"], "fd_teacher": frechet_distance(features, reference), "accuracy": row["acc_all"],
                             "direction": row["acc_direction"], "track_rms": row["track_rms"], "area_cv": row["area_cv"]})
        return summarise_sampling_seeds(per_seed)

    def _preview_clips(self, students: list[tuple[str, dict]], grid: list[int]) -> list[tuple[str, "torch.Tensor"]]:
        """Clips (N, 3, T, H, W) in [-1, 1]: the teacher at 50 and 4 steps, then each student, same noise and prompts."""
        from benchmarks.sampling import load_student_state
        from benchmarks.text_sampling import noise_for, sample_text_student, sample_text_teacher

        captions = self.captions()
        prompts = [captions[(i * 13) % len(captions)] for i in range(8)]  # 13 is coprime to 60: varied attributes
        noise = noise_for(self.family, len(prompts), PREVIEW_SEED)
        rows = [(f"teacher {n} steps, CFG {self.cfg:g}", sample_text_teacher(self.family, n, prompts, noise, self.cfg)) for n in (50, 4)]
        rank, alpha = _default_rank_alpha()
        for label, state in students:
            load_student_state(self.family, state, rank, alpha)
            rows.append((label, sample_text_student(self.family, grid, prompts, noise)))
        self._prompts = prompts
        return rows

    def preview(self, students: list[tuple[str, dict]], grid: list[int]) -> tuple[list[tuple[str, "torch.Tensor"]], list[str]]:
        """The PNG grid's rows: each clip's first, middle and last frame side by side (training.validation)."""
        from training.validation import frames_as_image

        rows = self._preview_clips(students, grid)
        self._clips = rows
        return [(label, (frames_as_image(clips) + 1) / 2) for label, clips in rows], list(self._prompts)

    def write_animation(self, path: Path) -> Path:
        """The last preview's clips as an animated WebP (rows as in the PNG), for the README."""
        from benchmarks.video_webp import save_webp

        return save_webp([clips for _, clips in self._clips], path)
