"""A two-object prompt that sizes only one object is outside the training grammar (two-object captions
name both sizes or neither): how often does the tiny model draw both objects, against the same prompt
in the grammar? Judged by `minisd.eval.judge` ("both": each object in its colour, shape and place).

    python experiments/prompt_grammar.py          # seeds 0-7 and 0-11, 25 DDIM steps, CFG 7.5
"""

from minisd import StableDiffusion
from minisd.eval import judge

pipe = StableDiffusion.from_pretrained("tiny")
pipe.progress = False
for prompt, n in [("a large red circle on the left and a blue square on the right", 8),
                  ("a large red circle on the left and a large blue square on the right", 12),
                  ("a red circle on the left and a blue square on the right", 12)]:
    ok = [judge(prompt, pipe(prompt, seed=s, num_inference_steps=25)[0])["both"] for s in range(n)]
    print(f"{sum(ok):2d} of {n:2d} seeds draw both: {prompt!r}", flush=True)
