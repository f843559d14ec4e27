"""Knowledge distillation from a float teacher: KL divergence between softened logits.

``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al.): the ``T^2``
keeps the gradient size independent of the temperature. The teacher can be the float model
being quantized or a larger one (ResNet-56 teaching ResNet-20); it runs in eval mode without
gradients, on the device of the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# T=1: the T^2-scaled KL's gradient grows about linearly with T, and at T=4 it swamped the
# cross-entropy's on a freshly calibrated 3-bit model and collapsed it within one step
# (docs/notes/qat.md); T=1 trains like no distillation at the start.
KD_TEMPERATURE = 1.0


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)``, averaged over the batch."""
    if student.shape != teacher.shape:
        raise ConfigError(
            f"the KD teacher has {teacher.shape[-1]} output classes but the student has "
            f"{student.shape[-1]} (outputs {tuple(teacher.shape)} vs {tuple(student.shape)}): "
            f"distill from a teacher trained on the same classes"
        )
    t = temperature
    s_log = F.log_softmax(student / t, dim=1)
    t_log = F.log_softmax(teacher / t, dim=1)
    return F.kl_div(s_log, t_log, reduction="batchmean", log_target=True) * (t * t)


class KnowledgeDistillation(nn.Module):
    """KD as a loss plug-in: ``kd(model, inputs, outputs, targets) -> scalar``.

    The teacher is not registered as a submodule, so it is neither trained nor saved with the
    student; it runs under ``no_grad`` and its parameters' ``requires_grad`` flags are left
    alone, so the float model itself can teach the copies that are prepared from it.
    """

    name = "kd"

    def __init__(self, teacher: nn.Module, temperature: float = KD_TEMPERATURE, weight: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"KD temperature must be positive, got {temperature}")
        if weight < 0:
            raise ConfigError(f"KD weight must be >= 0, got {weight}")
        self.__dict__["teacher"] = teacher.eval()
        self.temperature = temperature
        self.weight = weight

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight={self.weight}"

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        teacher = self.__dict__["teacher"]
        if teacher.training:
            teacher.eval()
        first = next(teacher.parameters(), None)
        if first is not None and first.device != inputs.device:
            teacher.to(inputs.device)
        return teacher(inputs)

    def check(self, student: nn.Module, example_inputs: torch.Tensor) -> None:
        """Fail early (before training starts) if teacher and student disagree on classes."""
        was = student.training
        student.eval()
        try:
            with torch.no_grad():
                kd_loss(student(example_inputs), self.teacher_logits(example_inputs), 1.0)
        finally:
            student.train(was)

    def forward(self, model, inputs: torch.Tensor, outputs: torch.Tensor, targets=None):
        return self.weight * kd_loss(outputs, self.teacher_logits(inputs), self.temperature)
