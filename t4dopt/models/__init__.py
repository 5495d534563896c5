"""Reference models: plain torch, importing nothing else of t4dopt.

`Sculpt4DDiT` is a Hunyuan3D-2.1-like 4D DiT (configs ``"tiny"`` and ``"hunyuan3d-2.1"``);
`sample_flow_matching` is the Euler sampler used by the demo and the benchmarks;
`sample_diffusers` the same for diffusers transformers (`pretrained("wan-tiny")`), called as
diffusers' pipelines call them.
"""

from t4dopt.models.diffusers_testbeds import sample_diffusers
from t4dopt.models.pretrained import pretrained
from t4dopt.models.sampler import flow_matching_timesteps, make_inputs, sample_flow_matching
from t4dopt.models.scm_net import SCM_CONFIGS, SCMConfig, SCMNet
from t4dopt.models.sculpt4d_dit import CONFIGS, Sculpt4DConfig, Sculpt4DDiT

__all__ = ["CONFIGS", "SCM_CONFIGS", "SCMConfig", "SCMNet", "Sculpt4DConfig", "Sculpt4DDiT", "flow_matching_timesteps",
           "make_inputs", "pretrained", "sample_diffusers", "sample_flow_matching"]
