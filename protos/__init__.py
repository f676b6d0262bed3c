"""The .proto files of the gRPC API and their generated modules (added with the serving issue)."""
