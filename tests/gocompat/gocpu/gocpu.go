// gocpu: a small SSH client that talks to a cpud the way the Go u-root cpu client does,
// using golang.org/x/crypto/ssh (our own code, written for the cpu-all compatibility tests).
//
// What it does on the wire (spec 3.6, 3.7, 3.8): publickey auth with one key, optional
// client.Listen("tcp", "127.0.0.1:0") (x/crypto's tcpip-forward, which validates
// forwarded-tcpip channels by its own rules), one env request per variable of its own
// environment followed by CPUNONCE, CPU_FSTAB and LC_GLENDA_CPU_FSTAB (a refused env aborts,
// as the OLD Go client does), optional pty-req "ansi" + window-change, exec with the Go
// command string, stdout and stderr apart, optional signal, and the exit status taken from
// *ssh.ExitError. Facts the test checks are written as key=value lines to -report.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

var (
	addr        = flag.String("addr", "", "server host:port")
	keyFile     = flag.String("key", "", "private key file")
	user        = flag.String("user", "gocpu", "ssh user name")
	listen      = flag.Bool("listen", false, "ask for a tcpip-forward with client.Listen and send CPUNONCE")
	listenAddr  = flag.String("listenaddr", "127.0.0.1:0", "with -listen: the address given to client.Listen")
	rawForward  = flag.String("rawforward", "", "send tcpip-forward for this bind address and port 0 by hand, dial the port, and check the forwarded-tcpip payload field by field (NEW x/crypto compares the address string); then exit")
	selfDial    = flag.Bool("selfdial", false, "with -listen: dial the forwarded port ourselves and check the nonce arrives through x/crypto's listener (no -port9p in exec)")
	backWait    = flag.Duration("backwait", 10*time.Second, "with -listen: how long to wait for the remote's back-channel")
	usePty      = flag.Bool("pty", false, "send pty-req ansi 80x24 and, after exec, window-change 132x50")
	signalName  = flag.String("signal", "", "send this signal (INT or TERM) after -signaldelay")
	signalEarly = flag.Bool("signalearly", false, "send -signal before exec (the server must hold it for the command)")
	signalAfter = flag.String("signalafter", "", "send -signal once the remote's stdout shows this text")
	fstab       = flag.String("fstab", "\n/tmp/cpu/usr /usr none defaults,bind 0 0\n", "CPU_FSTAB value")
	reportFile  = flag.String("report", "", "file for key=value facts")
)

var (
	reportMu sync.Mutex
	report   []string
)

func note(format string, args ...interface{}) {
	reportMu.Lock()
	defer reportMu.Unlock()
	report = append(report, fmt.Sprintf(format, args...))
}

func flush() {
	reportMu.Lock()
	defer reportMu.Unlock()
	if *reportFile != "" {
		_ = os.WriteFile(*reportFile, []byte(strings.Join(report, "\n")+"\n"), 0o644)
	}
}

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "gocpu: "+format+"\n", args...)
	note("error=%s", fmt.Sprintf(format, args...))
	flush()
	os.Exit(code)
}

// quote wraps one argument as the Go cpu client does: '...' with ' written as '"'"'.
func quote(arg string) string {
	return "'" + strings.ReplaceAll(arg, "'", `'"'"'`) + "'"
}

var signalNumbers = map[string]int{"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "TERM": 15}

func main() {
	flag.Parse()
	keyBytes, err := os.ReadFile(*keyFile)
	if err != nil {
		fail(80, "read key: %v", err)
	}
	signer, err := ssh.ParsePrivateKey(keyBytes)
	if err != nil {
		fail(80, "parse key: %v", err)
	}
	algoSigner, ok := signer.(ssh.AlgorithmSigner)
	if !ok {
		fail(80, "key %s cannot choose a signature algorithm", signer.PublicKey().Type())
	}
	config := &ssh.ClientConfig{
		User:            *user,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(&recordingSigner{algoSigner})},
		HostKeyCallback: ssh.InsecureIgnoreHostKey(),
		Timeout:         10 * time.Second,
	}
	client, err := ssh.Dial("tcp", *addr, config)
	if err != nil {
		fail(81, "dial: %v", err)
	}
	defer client.Close()
	note("server_version=%s", client.ServerVersion())

	if *rawForward != "" {
		result := checkRawForward(client, *rawForward)
		note("rawforward=%s", result)
		flush()
		if result != "ok" {
			os.Exit(87)
		}
		os.Exit(0)
	}

	var env []string
	env = append(env, os.Environ()...)
	cmdPrefix := ""
	backDone := make(chan string, 1)
	if *listen {
		listener, err := client.Listen("tcp", *listenAddr)
		if err != nil {
			fail(82, "listen: %v", err)
		}
		tcpAddr, ok := listener.Addr().(*net.TCPAddr)
		if !ok || tcpAddr.Port == 0 {
			fail(82, "listen: no port in %v", listener.Addr())
		}
		port := tcpAddr.Port
		note("listen_port=%d", port)
		raw := make([]byte, 16)
		if _, err := rand.Read(raw); err != nil {
			fail(82, "nonce: %v", err)
		}
		nonce := hex.EncodeToString(raw)
		if *selfDial {
			// Play the remote side ourselves: the server's listener is on this machine. No
			// CPUNONCE: the remote must not look for a back-channel it was given no port for.
			backDone <- selfDialCheck(listener, net.JoinHostPort(tcpAddr.IP.String(), fmt.Sprint(port)), nonce)
		} else {
			env = append(env, "CPUNONCE="+nonce)
			cmdPrefix = fmt.Sprintf("-port9p=%d", port)
			go func() { backDone <- acceptBackChannel(listener, nonce) }()
		}
	}
	env = append(env, "CPU_FSTAB="+*fstab, "LC_GLENDA_CPU_FSTAB="+*fstab)

	session, err := client.NewSession()
	if err != nil {
		fail(83, "session: %v", err)
	}
	defer session.Close()
	if *usePty {
		modes := ssh.TerminalModes{ssh.ECHO: 1, ssh.TTY_OP_ISPEED: 14400, ssh.TTY_OP_OSPEED: 14400}
		if err := session.RequestPty("ansi", 24, 80, modes); err != nil {
			fail(84, "request for pseudo terminal failed: %v", err)
		}
		note("pty=ok")
	}
	accepted := 0
	for _, kv := range env {
		name, value := kv, ""
		if i := strings.Index(kv, "="); i >= 0 {
			name, value = kv[:i], kv[i+1:]
		}
		// OLD Go client behaviour: the first refused env aborts the session.
		if err := session.Setenv(name, value); err != nil {
			fail(85, "Warning: c.session.Setenv(%q, %q): %v", name, value, err)
		}
		accepted++
	}
	note("env_accepted=%d", accepted)

	if *signalName != "" && *signalEarly {
		if err := session.Signal(ssh.Signal(*signalName)); err != nil {
			note("signal_error=%v", err)
		}
	}
	command := cmdPrefix
	for _, a := range flag.Args() {
		command += " " + quote(a)
	}
	note("exec=%s", command)
	// With a pty, stdin is held back until the window-change is sent, so the remote sees the
	// new size before it reads its first line.
	gate := make(chan struct{})
	if *usePty {
		session.Stdin = &gatedReader{gate: gate, r: os.Stdin}
	} else {
		session.Stdin = os.Stdin
	}
	marker := &markerWriter{w: os.Stdout, marker: []byte(*signalAfter), seen: make(chan struct{})}
	session.Stdout = marker
	session.Stderr = os.Stderr
	if err := session.Start(command); err != nil {
		fail(86, "Failed to run %q: %v", command, err)
	}
	if *usePty {
		if err := session.WindowChange(50, 132); err != nil {
			note("window_change=%v", err)
		} else {
			note("window_change=ok")
		}
		close(gate)
	}
	if *signalName != "" && !*signalEarly {
		go func() {
			select {
			case <-marker.seen:
			case <-time.After(20 * time.Second):
				note("signal_marker=timeout")
			}
			if err := session.Signal(ssh.Signal(*signalName)); err != nil {
				note("signal_error=%v", err)
			}
		}()
	}
	waitErr := session.Wait()
	code := 0
	if waitErr != nil {
		var exitErr *ssh.ExitError
		if errors.As(waitErr, &exitErr) {
			code = exitErr.ExitStatus()
			if exitErr.Signal() != "" {
				note("exit_signal=%s", exitErr.Signal())
				if code == 0 || code == -1 {
					code = 128 + signalNumbers[exitErr.Signal()]
				}
			}
		} else {
			fmt.Fprintf(os.Stderr, "SSH error %v\n", waitErr)
			code = 1
		}
	}
	note("exit=%d", code)
	if *listen {
		select {
		case r := <-backDone:
			note("backchannel=%s", r)
		case <-time.After(*backWait):
			note("backchannel=none")
		}
	}
	flush()
	os.Exit(code)
}

// recordingSigner notes which signature algorithm x/crypto picked for the user key (from the
// server's server-sig-algs; without ext-info an RSA key would sign with legacy ssh-rsa).
type recordingSigner struct {
	ssh.AlgorithmSigner
}

func (r *recordingSigner) SignWithAlgorithm(rand io.Reader, data []byte, algorithm string) (*ssh.Signature, error) {
	note("sign_algo=%s", algorithm)
	return r.AlgorithmSigner.SignWithAlgorithm(rand, data, algorithm)
}

// markerWriter passes output through and closes seen once marker has appeared in it.
type markerWriter struct {
	w      io.Writer
	marker []byte
	buf    []byte
	seen   chan struct{}
	done   bool
}

func (m *markerWriter) Write(p []byte) (int, error) {
	if !m.done && len(m.marker) > 0 {
		m.buf = append(m.buf, p...)
		if bytes.Contains(m.buf, m.marker) {
			m.done = true
			m.buf = nil
			defer close(m.seen)
		}
	}
	return m.w.Write(p)
}

// gatedReader blocks its first Read until gate is closed.
type gatedReader struct {
	gate chan struct{}
	r    io.Reader
}

func (g *gatedReader) Read(p []byte) (int, error) {
	<-g.gate
	return g.r.Read(p)
}

// readNonce reads exactly 32 bytes and compares them with the nonce.
func readNonce(conn io.Reader, nonce string) string {
	got := make([]byte, 32)
	if _, err := io.ReadFull(conn, got); err != nil {
		return "read-error:" + err.Error()
	}
	if string(got) != nonce {
		return "mismatch:" + string(got)
	}
	return "nonce-ok"
}

// acceptBackChannel waits for the remote's dial through the forwarded port, as the Go client
// does, checks the nonce, and closes (there is no Go 9P server in this test).
func acceptBackChannel(listener net.Listener, nonce string) string {
	conn, err := listener.Accept()
	listener.Close()
	if err != nil {
		return "accept-error:" + err.Error()
	}
	defer conn.Close()
	note("forwarded_from=%s", conn.RemoteAddr())
	return readNonce(conn, nonce)
}

// selfDialCheck connects to the server-side listening port, sends the nonce, and expects it
// to come out of x/crypto's listener; then checks data flows back the other way too.
func selfDialCheck(listener net.Listener, address string, nonce string) string {
	dialed, err := net.DialTimeout("tcp", address, 5*time.Second)
	if err != nil {
		return "dial-error:" + err.Error()
	}
	defer dialed.Close()
	if _, err := dialed.Write([]byte(nonce)); err != nil {
		return "write-error:" + err.Error()
	}
	type accepted struct {
		conn net.Conn
		err  error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := listener.Accept()
		ch <- accepted{c, err}
	}()
	var conn net.Conn
	select {
	case a := <-ch:
		if a.err != nil {
			return "accept-error:" + a.err.Error()
		}
		conn = a.conn
	case <-time.After(10 * time.Second):
		return "accept-timeout"
	}
	defer conn.Close()
	listener.Close()
	note("forwarded_from=%s", conn.RemoteAddr())
	result := readNonce(conn, nonce)
	if result != "nonce-ok" {
		return result
	}
	if _, err := conn.Write([]byte("pong")); err != nil {
		return "reply-error:" + err.Error()
	}
	back := make([]byte, 4)
	_ = dialed.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(dialed, back); err != nil || string(back) != "pong" {
		return fmt.Sprintf("reply-lost:%q:%v", back, err)
	}
	return "nonce-ok+reply-ok"
}

// checkRawForward asks for a forward of bindAddr:0 by hand and checks the forwarded-tcpip
// channel our dial causes: the address string echoed verbatim, the allocated port, an IP
// literal and a valid port as originator.
func checkRawForward(client *ssh.Client, bindAddr string) string {
	channels := client.HandleChannelOpen("forwarded-tcpip")
	if channels == nil {
		return "forwarded-tcpip handler already taken"
	}
	request := ssh.Marshal(&struct {
		Addr string
		Port uint32
	}{bindAddr, 0})
	ok, reply, err := client.SendRequest("tcpip-forward", true, request)
	if err != nil || !ok {
		return fmt.Sprintf("tcpip-forward refused: %v", err)
	}
	var allocated struct{ Port uint32 }
	if err := ssh.Unmarshal(reply, &allocated); err != nil || allocated.Port == 0 || allocated.Port > 65535 {
		return fmt.Sprintf("bad reply %x: %v", reply, err)
	}
	dialHost := bindAddr
	if dialHost == "localhost" {
		dialHost = "127.0.0.1"
	}
	dialed, err := net.DialTimeout("tcp", net.JoinHostPort(dialHost, fmt.Sprint(allocated.Port)), 5*time.Second)
	if err != nil {
		return "dial: " + err.Error()
	}
	defer dialed.Close()
	var newChannel ssh.NewChannel
	select {
	case newChannel = <-channels:
	case <-time.After(10 * time.Second):
		return "no forwarded-tcpip channel"
	}
	var payload struct {
		Addr       string
		Port       uint32
		OriginAddr string
		OriginPort uint32
	}
	if err := ssh.Unmarshal(newChannel.ExtraData(), &payload); err != nil {
		return "payload: " + err.Error()
	}
	newChannel.Reject(ssh.Prohibited, "test done")
	note("forwarded_payload=%s %d %s %d", payload.Addr, payload.Port, payload.OriginAddr, payload.OriginPort)
	switch {
	case payload.Addr != bindAddr:
		return fmt.Sprintf("connected address %q, want %q", payload.Addr, bindAddr)
	case payload.Port != allocated.Port:
		return fmt.Sprintf("connected port %d, want %d", payload.Port, allocated.Port)
	case net.ParseIP(payload.OriginAddr) == nil:
		return fmt.Sprintf("originator %q is not an IP literal", payload.OriginAddr)
	case payload.OriginPort == 0 || payload.OriginPort > 65535:
		return fmt.Sprintf("originator port %d", payload.OriginPort)
	}
	return "ok"
}
