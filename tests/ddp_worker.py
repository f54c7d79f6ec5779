"""Run by tests/test_distributed.py under torchrun: train, then save this rank's teacher."""

import sys

import torch

from softteacher import distributed
from softteacher.config import load_config
from softteacher.engine import train

if __name__ == "__main__":
    config_file, dump_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    cfg = load_config("tiny", config_file)
    result = train(cfg, progress=False)
    rank = distributed.env_info().rank
    torch.save({"teacher": result.teacher.state_dict(), "student": result.student.state_dict(),
                "metrics": result.metrics}, f"{dump_dir}/rank{rank}.pt")
    distributed.shutdown()
