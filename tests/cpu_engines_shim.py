"""`python cpu_engines_shim.py train ...` = `edlm train ...` with FSDP / DeepSpeed on CPU processes.

accelerate 1.15 runs neither on CPU processes (docs/scale-out.md has the lines):
- FSDP is selected only for GPU-type distributed types (accelerate/state.py, AcceleratorState.__init__,
  the `elif self.distributed_type in [MULTI_GPU, ...]` branch); CPU processes are MULTI_CPU -> DDP.
  The shim applies the FSDP plugin to MULTI_CPU too (run with ACCELERATE_USE_CPU=true).
- DeepSpeed is skipped with ACCELERATE_USE_CPU (`... and not cpu`), and without it
  PartialState._prepare_backend finds no device, so each process believes it is alone
  (num_processes 1) while deepspeed.comm joins them. The shim gives such launched processes the
  gloo backend (MULTI_CPU), which accelerate then turns into DEEPSPEED.
torch's FSDP2 and DeepSpeed's CPU accelerator do the rest: the tests run edlm's own loop and
the shipped configs. Not used by edlm itself.
"""

import os
import sys

import accelerate.state as st
import torch
from accelerate.utils import DistributedType

_init = st.AcceleratorState.__init__
_prepare_backend = st.PartialState._prepare_backend


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # copied back on every init
        self.fsdp_plugin = fsdp_plugin


def _gloo_for_launched_cpu_processes(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if (found is None and kind == DistributedType.NO and not torch.cuda.is_available()
            and int(os.environ.get("LOCAL_RANK", -1)) != -1):
        return "gloo", DistributedType.MULTI_CPU
    return found, kind


st.AcceleratorState.__init__ = _fsdp_on_cpu
st.PartialState._prepare_backend = _gloo_for_launched_cpu_processes

from edlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
