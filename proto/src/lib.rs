//! The wire between the coordinator and the workers (gRPC services and messages).
//! Single-process training needs none of it; the distributed trainer defines it here.
