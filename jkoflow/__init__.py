"""jkoflow: continuous normalizing flows trained block by block with the JKO scheme.

Example:
    >>> import jkoflow
    >>> x = jkoflow.datasets.load("checkerboard", n=2000)
    >>> x.shape
    (2000, 2)
"""

from . import datasets
from .config import DataConfig, JKOConfig
from .errors import InputError
from .flow import Flow
from .objectives import JKOLoss, OTFlowLoss, gaussian_log_prob, jko_loss, otflow_loss
from .ode import ODEResult, integrate
from .otflow import OTFlowConfig, OTFlowHistory, train_otflow
from .records import BlockRecord, JKOHistory, StageRecord
from .trainer import JKOTrainer, train_jko

__version__ = "0.1.0"

__all__ = [
    "BlockRecord",
    "DataConfig",
    "Flow",
    "InputError",
    "JKOConfig",
    "JKOHistory",
    "JKOLoss",
    "JKOTrainer",
    "ODEResult",
    "OTFlowConfig",
    "OTFlowHistory",
    "OTFlowLoss",
    "StageRecord",
    "datasets",
    "gaussian_log_prob",
    "integrate",
    "jko_loss",
    "otflow_loss",
    "train_jko",
    "train_otflow",
]
