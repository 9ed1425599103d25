from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_STATUS_UNSPECIFIED: _ClassVar[ItemStatus]
    ITEM_STATUS_OK: _ClassVar[ItemStatus]
    ITEM_STATUS_IMAGE_REQUIRED: _ClassVar[ItemStatus]
ITEM_STATUS_UNSPECIFIED: ItemStatus
ITEM_STATUS_OK: ItemStatus
ITEM_STATUS_IMAGE_REQUIRED: ItemStatus

class ImageSentences(_message.Message):
    __slots__ = ("digest", "image", "sentences", "region")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    digest: str
    image: bytes
    sentences: _containers.RepeatedScalarFieldContainer[str]
    region: Region
    def __init__(self, digest: _Optional[str] = ..., image: _Optional[bytes] = ..., sentences: _Optional[_Iterable[str]] = ..., region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("human_box", "object_box")
    HUMAN_BOX_FIELD_NUMBER: _ClassVar[int]
    OBJECT_BOX_FIELD_NUMBER: _ClassVar[int]
    human_box: _containers.RepeatedScalarFieldContainer[float]
    object_box: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, human_box: _Optional[_Iterable[float]] = ..., object_box: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "items", "timeout_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[ImageSentences]
    timeout_ms: int
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ImageSentences, _Mapping]]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class PairScore(_message.Message):
    __slots__ = ("match_logit", "match_prob", "cached")
    MATCH_LOGIT_FIELD_NUMBER: _ClassVar[int]
    MATCH_PROB_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    match_logit: float
    match_prob: float
    cached: bool
    def __init__(self, match_logit: _Optional[float] = ..., match_prob: _Optional[float] = ..., cached: _Optional[bool] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("status", "scores")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    status: ItemStatus
    scores: _containers.RepeatedCompositeFieldContainer[PairScore]
    def __init__(self, status: _Optional[_Union[ItemStatus, str]] = ..., scores: _Optional[_Iterable[_Union[PairScore, _Mapping]]] = ...) -> None: ...

class RequestStatus(_message.Message):
    __slots__ = ("code", "message", "field", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "items", "status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[ItemResult]
    status: RequestStatus
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., status: _Optional[_Union[RequestStatus, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_image_bytes", "max_image_pixels", "max_images_per_request", "max_sentences_per_image", "max_sentence_tokens", "max_message_bytes", "max_image_side", "max_image_aspect")
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_SENTENCES_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_SENTENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_ASPECT_FIELD_NUMBER: _ClassVar[int]
    max_image_bytes: int
    max_image_pixels: int
    max_images_per_request: int
    max_sentences_per_image: int
    max_sentence_tokens: int
    max_message_bytes: int
    max_image_side: int
    max_image_aspect: float
    def __init__(self, max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_sentences_per_image: _Optional[int] = ..., max_sentence_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_image_aspect: _Optional[float] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_id", "fingerprint", "itm_start_token", "dtype", "limits", "ready", "region_policy")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ITM_START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REGION_POLICY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    fingerprint: str
    itm_start_token: str
    dtype: str
    limits: Limits
    ready: bool
    region_policy: str
    def __init__(self, model_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., itm_start_token: _Optional[str] = ..., dtype: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., ready: _Optional[bool] = ..., region_policy: _Optional[str] = ...) -> None: ...
