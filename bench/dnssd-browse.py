#!/usr/bin/python3
"""One fresh browse with python-zeroconf, an mDNS implementation independent of ours, as
Go's decpu does it: ask for _ncpu._tcp.local. for WINDOW seconds (Go: 1 s), resolving each
instance within the same window. Prints "found NAME ADDR..." for each resolved instance;
exits 0 if INSTANCE was resolved to an address, 1 if not, 2 if python-zeroconf is missing.

Usage: dnssd-browse.py WINDOW_SECONDS INSTANCE
"""
import sys
import time

try:
    from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, Zeroconf
except ImportError:
    print("python3-zeroconf is not installed", file=sys.stderr)
    sys.exit(2)

TYPE = "_ncpu._tcp.local."
window = float(sys.argv[1])
want = sys.argv[2] + "." + TYPE
seen = set()


class Listener:
    def add_service(self, zc, type_, name):
        seen.add(name)

    update_service = add_service

    def remove_service(self, zc, type_, name):
        pass


deadline = time.monotonic() + window
zc = Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
found = False
try:
    ServiceBrowser(zc, TYPE, listener=Listener())
    resolved = set()
    while time.monotonic() < deadline and not found:
        for name in list(seen - resolved):
            info = ServiceInfo(TYPE, name)
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms > 0 and info.request(zc, left_ms) and info.parsed_addresses():
                resolved.add(name)
                print("found", name, *info.parsed_addresses())
                found = found or name.lower() == want.lower()
        time.sleep(0.01)
finally:
    zc.close()
sys.exit(0 if found else 1)
