"""The trainer's side of the teacher, one job per module, imported in this order (no circle):

- ``types``: ``ScoreQuery``, ``ScorePlan``, ``BatchScores``, ``TeacherStats`` and the interfaces
  ``TeacherBackend`` (scores queries) and ``ScoringClient`` (one service's client);
- ``pool``: ``EndpointPool``, round robin with failover over teacher endpoints;
- ``backends``: ``LocalTeacher`` (in-process engine), ``GrpcTeacher`` / ``TritonTeacher`` (one
  service), ``ReadThroughBackend`` (Redis first, the pool for the misses), ``build_backend``;
- ``scores``: ``TeacherScores``, the adapter to the losses (sentences of a batch, their scores,
  ``teacher_verb_margin`` on each target);
- ``prefetch``: ``TeacherPrefetcher`` and ``PrefetchingLoader`` (scores fetched ahead, deadline);
- ``prewarm``: every candidate sentence of every training image scored once, ahead of training.
"""

from student.teacher.backends import GrpcTeacher, LocalTeacher, ReadThroughBackend, TritonTeacher, build_backend
from student.teacher.pool import EndpointPool
from student.teacher.prefetch import PrefetchingLoader, TeacherPrefetcher
from student.teacher.scores import TeacherScores
from student.teacher.types import BatchScores, ScorePlan, ScoreQuery, TeacherBackend, TeacherStats

__all__ = [
    "BatchScores",
    "EndpointPool",
    "GrpcTeacher",
    "LocalTeacher",
    "PrefetchingLoader",
    "ReadThroughBackend",
    "ScorePlan",
    "ScoreQuery",
    "TeacherBackend",
    "TeacherPrefetcher",
    "TeacherScores",
    "TeacherStats",
    "TritonTeacher",
    "build_backend",
]
