"""Network faults that the tests' HTTP servers and proxies inject."""
import socket
import struct
from http.server import BaseHTTPRequestHandler


def reset(handler: BaseHTTPRequestHandler) -> None:
    """Close ``handler``'s connection with a TCP reset, no FIN first, at
    once.  Closing the socket alone would not do: its reader and writer
    keep it open, and the client waits for an answer until its timeout."""
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                  struct.pack('ii', 1, 0))
    handler.close_connection = True
    for f in (handler.wfile, handler.rfile):
        f.close()
    handler.connection.close()
