"""Same-run A/B of two revisions of the kernel package, loaded side by side in one process, through
bench/attention.py's ab(): dense, ACP on mixed and on near-1 gates, interleaved rounds. On a CUDA machine,
from the repository root:

    mkdir -p /tmp/old && git archive REV kernels/foxkernels | tar -x -C /tmp/old && mv /tmp/old/kernels/foxkernels /tmp/old/foxkernels_old
    OLD=/tmp/old ROUNDS=2 OUT=DIR PYTHONPATH=kernels:. python3 bench/ab/revision_ab.py [SHAPE ...]

Writes DIR/ab_old_new.json ("IMPL=old" is REV, "IMPL=new" the working tree).
"""
import json, os, sys, time
sys.path[:0] = [os.environ.get("OLD", "/tmp/old"), "kernels", ".", "bench"]
import attention as B  # bench/attention.py
import foxkernels as new
import foxkernels_old as old
import torch, triton

class Proxy:
    def __getattr__(self, name):
        return getattr(old if os.environ.get("FOXKERNELS_IMPL") == "old" else new, name)

B.foxkernels = Proxy()
res = {}
shapes = sys.argv[1:] or list(B.SHAPES)
B.ab("cuda", res, ["IMPL=old", "IMPL=new"], shapes, rounds=int(os.environ.get("ROUNDS", "2")))
out = dict(command="PYTHONPATH=kernels:. python3 bench/ab/revision_ab.py " + " ".join(sys.argv[1:]),
           device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
           date=time.strftime("%Y-%m-%dT%H:%M:%S"), **res)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ab_old_new%s.json" % os.environ.get("TAG", "")), "w"), indent=1)
