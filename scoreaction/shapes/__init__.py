"""The shapes world: captions of coloured shapes covering GenEval's six categories, their procedural
ground-truth scenes, and a GenEval-style checker of images against them (docs/shapes.md).

    grammar     captions -> specs (parse, category), every caption, the train / held-out split
    scenes      render(caption, seed, size) -> uint8 image; sample_scene / sample_batch for training pairs
    checker     detect objects, score an image against a caption (binary and partial), summarise
    validation  the checker's accuracy on ground truth and on other captions
    reward      `geneval` / `geneval:binary` as an image reward of text-to-image tasks
    vocab       the model's tokenizer: CLIP's BPE with each word of the grammar one token
    pretrain    `scoreaction pretrain --task shapes`: CLIP, VAE and UNet -> a StableDiffusionPipeline folder
    accuracy    a pipeline's checker accuracy per category on captions drawn from a split
"""

from scoreaction.shapes.checker import Detection, Score, detect, evaluate, score, summarise
from scoreaction.shapes.grammar import (CATEGORIES, COLOURS, HELD_OUT, NUMBERS, RELATIONS, SHAPES, Group, Spec,
                                        captions, category, combinations, parse, specs, split)
from scoreaction.shapes.scenes import render, sample_batch, sample_scene

__all__ = ["CATEGORIES", "COLOURS", "HELD_OUT", "NUMBERS", "RELATIONS", "SHAPES", "Group", "Spec", "captions",
           "category", "combinations", "parse", "specs", "split", "render", "sample_batch", "sample_scene",
           "Detection", "Score", "detect", "evaluate", "score", "summarise"]
