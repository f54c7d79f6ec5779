"""Run by tests/test_distributed.py under torchrun: train, then save this rank's models and the
detections on val that it holds after a sharded inference with the teacher.

With a third argument ``split``, train the same run again in two parts (stopped at iteration
2, resumed by the same processes) and save this rank's models of it too; then resume it once
more with rank 1 unable to read the checkpoint, and write what each rank refused.
"""

import copy
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
    # what each rank holds of an evaluation's detections: rank 0 all of them, the others none
    from softteacher.engine import inference, load_data

    results = inference(result.teacher, load_data(cfg).val, cfg, torch.device("cpu"))
    torch.save({"teacher": result.teacher.state_dict(), "student": result.student.state_dict(),
                "metrics": result.metrics, "results": results}, f"{dump_dir}/rank{rank}.pt")
    if sys.argv[3:] == ["split"]:
        part = copy.deepcopy(cfg)
        part.train.output_dir += "-split"
        part.solver.max_iter = 2
        train(part, progress=False)
        part.solver.max_iter = cfg.solver.max_iter
        result = train(part, resume="auto", progress=False)
        torch.save({"teacher": result.teacher.state_dict(), "student": result.student.state_dict()},
                   f"{dump_dir}/rank{rank}-split.pt")
        # a node that cannot see rank 0's checkpoint (an output folder not shared): every rank
        # refuses, rather than starting at another iteration and waiting forever
        import os

        from softteacher.checkpoint import CheckpointError

        if rank == 1:
            os.access = lambda path, mode: False
        try:
            train(part, resume="auto", progress=False)
        except CheckpointError as e:
            with open(f"{dump_dir}/rank{rank}-refused.txt", "w") as f:
                f.write(str(e))
    distributed.shutdown()
