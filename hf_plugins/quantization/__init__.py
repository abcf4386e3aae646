"""RoSTE's building blocks, usable on their own: fake quantisers with a straight-through estimator, Hadamard
transforms of any size the models use, model surgery (norm fusion, R1, quantised modules with online R2/R3/R4), the
adaptive rotation search and the quantised export. `prepare_model_for_roste` runs the surgery and the search in order;
`RoSTETrainer` (in `hf_plugins.trainers`) prepares the model with it, trains and exports."""

from .export import export_roste, load_roste_model
from .hadamard import (
    HadamardTransform,
    fwht,
    hadamard_factorization,
    hadamard_matrix,
    random_orthogonal_matrix,
    random_sign_hadamard_matrix,
)
from .modules import QuantConfig, QuantLinear, RoSTEAttentionMixin
from .prepare import prepare_model_for_roste
from .quantizer import dequantize, fake_quantize, fake_quantize_values, quantization_error, quantize_to_grid
from .search import measure_site_errors, search_rotations
from .spec import QuantSpec
from .surgery import (
    SUPPORTED_MODEL_TYPES,
    check_supported_model,
    clear_weight_caches,
    fuse_norms,
    patch_model,
    rotate_r1,
    set_rotations,
    untie_embeddings,
)


__all__ = [
    "HadamardTransform",
    "QuantConfig",
    "QuantLinear",
    "QuantSpec",
    "RoSTEAttentionMixin",
    "SUPPORTED_MODEL_TYPES",
    "check_supported_model",
    "clear_weight_caches",
    "dequantize",
    "export_roste",
    "fake_quantize",
    "fake_quantize_values",
    "fuse_norms",
    "fwht",
    "hadamard_factorization",
    "hadamard_matrix",
    "load_roste_model",
    "measure_site_errors",
    "patch_model",
    "prepare_model_for_roste",
    "quantization_error",
    "quantize_to_grid",
    "random_orthogonal_matrix",
    "random_sign_hadamard_matrix",
    "rotate_r1",
    "search_rotations",
    "set_rotations",
    "untie_embeddings",
]
