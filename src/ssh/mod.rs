//! Our layer over russh: keys, authorized keys, known_hosts, ssh_config, client and server.
