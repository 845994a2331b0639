"""Person-matte worker: runs inside the matte venv (mediapipe 0.10.21, numpy<2), NOT in the main environment.

Protocol (files in, masks out; the model loads once per call): ``python matte_worker.py JOB.json`` where JOB.json is
``{"model_selection": 0, "grey": 128, "items": [["in.png", "mask.png", "matted.png"], ...]}`` (the third path is
optional). For each item it reads the RGB image, runs mediapipe selfie segmentation, writes the person probability
as an 8-bit grey PNG (0..255) to ``mask.png`` and, when given, the image composited over ``grey`` to ``matted.png``
(each written to a temp file, then renamed). It prints one JSON line ``{"done": N}`` to stdout at the end; errors exit
non-zero with
the message on stderr. Only numpy, OpenCV and mediapipe are imported: idforge is not installed in that venv.
"""

import json
import os
import sys


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: matte_worker.py JOB.json\n")
        return 2
    with open(argv[1]) as fh:
        job = json.load(fh)
    import cv2
    import mediapipe as mp
    import numpy as np

    done = 0
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=int(job.get("model_selection", 0))) as seg:
        grey = float(job.get("grey", 128))
        for item in job["items"]:
            src, dst = item[0], item[1]
            matted = item[2] if len(item) > 2 else None
            bgr = cv2.imread(src, cv2.IMREAD_COLOR)
            if bgr is None:
                sys.stderr.write(f"cannot read {src}\n")
                return 1
            res = seg.process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            mask = np.round(np.clip(res.segmentation_mask, 0.0, 1.0) * 255).astype(np.uint8)
            outputs = [(dst, mask)]
            if matted:
                a = mask.astype(np.float32)[..., None] / 255.0
                comp = bgr.astype(np.float32) * a + grey * (1.0 - a)
                outputs.append((matted, np.clip(np.round(comp), 0, 255).astype(np.uint8)))
            for path, img in outputs:
                tmp = path + ".tmp.png"
                if not cv2.imwrite(tmp, img, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
                    sys.stderr.write(f"cannot write {path}\n")
                    return 1
                os.replace(tmp, path)
            done += 1
    sys.stdout.write(json.dumps({"done": done}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
