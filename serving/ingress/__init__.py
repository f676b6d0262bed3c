"""The ingress: HTTP (OpenAI and native) and gRPC in, each request made the typed GenerateRequest once and sent to a
replica of its tier's pool, its events back as text. Imports no torch.

    deployment.py     the Serve deployment (Ingress): the FastAPI app and the gRPC methods over one Frontend
    http_server.py    the HTTP app: middleware, error format, routes; grpc_server.py the gRPC servicer
    frontend.py       transport-free: tier, settings, request id, open a request and stream its chunks
    protocol.py       the request bodies (pydantic); openai_format.py, chat_output.py: OpenAI's reply shapes
    auth.py, stop.py  API keys and their limits; stop strings
"""
