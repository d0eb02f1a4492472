"""An export in bf16 to carry back from the device (`moshi.files.cast_checkpoint`), without its codec: the
codec is the shipped one, carried once (arms.sh copies it back in).

    python bf16.py EXPORT_DIR OUT_DIR
"""

import sys

from ttt_speech.moshi.files import MIMI_WEIGHTS_NAME, cast_checkpoint

out = cast_checkpoint(sys.argv[1], sys.argv[2], "bfloat16")
(out / MIMI_WEIGHTS_NAME).unlink(missing_ok=True)
