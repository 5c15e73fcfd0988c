"""The bundled recipes: their YAML, the fragments they compose, and their models and data modules.

``statplug recipes`` lists the recipe files of this folder (``tabular.yaml``, ...); the
fragments they name in ``defaults`` are in ``configs/`` (``configs/trainer/cpu.yaml``, ...). Each
model and data module is an ordinary LightningModule / LightningDataModule built from a recipe's
``_target_`` entries, runs on CPU with no download, and keeps its non-trained state in statplug
modules:

========================  ==========================================  ============================
module                    model                                       data
========================  ==========================================  ============================
:mod:`.tabular`           MLP behind a :class:`~statplug.RunningNorm`  sklearn breast cancer, wine
:mod:`.vision`            small CNN (activations: ``ActivationStats``)  sklearn digits (8x8)
:mod:`.tinylm`            tiny causal transformer, CausalMask + RoPE    synthetic sequences
========================  ==========================================  ============================
"""

from .data import SequenceDataModule, SklearnDataModule
from .tabular import TabularMLP
from .tinylm import TinyLM, padding_mask
from .vision import DigitsCNN

__all__ = [
    "DigitsCNN",
    "SequenceDataModule",
    "SklearnDataModule",
    "TabularMLP",
    "TinyLM",
    "padding_mask",
]
