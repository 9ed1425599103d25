"""Fine-tune a BLIP image-text-matching teacher: ``python -m teacher_server finetune``.

A random or generic teacher knows little about human-object interactions; this package adapts a
``BlipForImageTextRetrieval`` with its own ITM objective (2-class cross-entropy of ``itm_head``,
class 1 = match) on image-sentence pairs, so that it ranks the verbs of a pair before anyone
distils from it. Pairs come from HOI annotations (HICO-DET / V-COCO format) or a JSONL file.

- ``examples``: what the annotations or JSONL say about each image's sentences, and the negatives
  a step samples (numpy only);
- ``settings``: ``FinetuneSettings``, validated on construction;
- ``objective``: ITM logits with the vision encoder once per image, the balanced loss, token ids
  and preprocessed images;
- ``checkpoint``: run position, RNG states, atomic writes;
- ``training``: ``finetune`` itself (start or resume, train, save);
- ``cli``: the command's flags.

The sentence rules (``SentenceTable``, ``resolve_correspondence``) live in ``teacher_server.hoi``,
shared with ``eval-itm``, which does not import this package.
"""
