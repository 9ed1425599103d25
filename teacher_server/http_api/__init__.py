"""HTTP/JSON API and web page of the teacher: FastAPI on uvicorn, in the ``serve`` event loop.

One module per concern:

- ``schemas``: request and response models, and what OpenAPI says about bodies and errors;
- ``errors``: the JSON error body and how every failure maps to it (as gRPC maps it);
- ``bodies``: reading a JSON or multipart body; triplets -> sentences;
- ``security``: the bearer token, as a FastAPI security dependency;
- ``middleware``: request metrics and the request body limit (pure ASGI);
- ``routes``: ``create_app``, the routes, the page and the offline ``/docs``;
- ``server``: ``serve_http`` and the uvicorn server it runs.

The bearer token, TLS and the size limits are the service settings gRPC uses.
"""
