"""A 2-process gloo script that exits while gloo's worker thread is still dropping the tensors of its last collective,
with the process group kept alive as a DDP wrapper keeps it. Without `destroy_process_group_at_exit`'s wait the
worker needs the GIL after interpreter finalisation has begun and the process aborts ("terminate called without an
active exception"); 20000 tensors make the worker's release take long enough to lose that race every time."""

import warnings

import torch
import torch.distributed as dist

from hf_plugins.utils import destroy_process_group_at_exit


dist.init_process_group("gloo")
group = dist.distributed_c10d._get_default_group()  # held to the end, as a DDP wrapper holds it
destroy_process_group_at_exit()
tensors = [torch.ones(1) for _ in range(20000)]
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # the coalesced all-reduce is deprecated; one work, many tensors
    work = dist.all_reduce_coalesced(tensors, async_op=True)
work.wait()
assert tensors[0].item() == dist.get_world_size()
del tensors, work
print(f"EXITING {dist.get_rank()}", flush=True)
