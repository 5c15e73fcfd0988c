"""Small models and datamodules used by the bundled recipes (``statplug recipes`` lists them).

Each is an ordinary LightningModule / LightningDataModule built from a recipe's ``_target_``
entries, runs on CPU with no download, and keeps its non-trained state in statplug modules:

========================  ==========================================  ============================
module                    model                                       data
========================  ==========================================  ============================
:mod:`.tabular`           MLP behind a :class:`~statplug.RunningNorm`  sklearn breast cancer, wine
:mod:`.vision`            small CNN (activations: ``ActivationStats``)  sklearn digits (8x8)
:mod:`.tinylm`            tiny causal transformer, CausalMask + RoPE    synthetic sequences
========================  ==========================================  ============================
"""

from statplug.recipes_lib.data import SequenceDataModule, SklearnDataModule
from statplug.recipes_lib.tabular import TabularMLP
from statplug.recipes_lib.tinylm import TinyLM
from statplug.recipes_lib.vision import DigitsCNN

__all__ = ["DigitsCNN", "SequenceDataModule", "SklearnDataModule", "TabularMLP", "TinyLM"]
