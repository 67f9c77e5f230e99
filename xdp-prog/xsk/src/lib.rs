//! AF_XDP sockets for flynode (being written).
