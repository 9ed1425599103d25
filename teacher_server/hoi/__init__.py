"""The HOI vocabulary that the teacher and the student share.

- ``classes``: verb and object names of HICO-DET and V-COCO, COCO ids, the HOI id table;
- ``prompts``: the one function that turns a (verb, object) triplet into the sentence the teacher
  scores, and the candidate sentences of an object;
- ``annotations``: reading and validating annotation files in the DETR-line HICO-DET / V-COCO
  JSON format;
- ``digest``: ``image_digest``, the content address of an image (SHA-256 of its file bytes) that
  every cache key, request and data loader uses;
- ``errors``: ``DatasetError``, the one exception of that domain.

Dependencies run one way: the student imports this package, the teacher's fine-tuning and HTTP
API use it, and nothing here imports the student. numpy and PIL only (no torch), so the
client-side tools and the evaluators can import it cheaply.
"""
