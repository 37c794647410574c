// gocpud: a small SSH server in the style of the Go u-root cpud, built on
// github.com/gliderlabs/ssh and golang.org/x/crypto/ssh (our own code, written for the
// cpu-all compatibility tests).
//
// On the wire (spec 2.2, 4.4 to 4.7): version string "SSH-2.0-linux amd64", a fresh RSA-2048
// host key, publickey auth against the first key of -pk, env/pty/exec sessions whose command
// words are run after the leading -port9p=N is stripped, exit-status, and tcpip-forward
// through gliderlabs' ForwardedTCPHandler (x/crypto sends ext-info server-sig-algs itself).
// With -port9p=N the handler plays the remote mount: it dials 127.0.0.1:N, writes the
// CPUNONCE it received, sends a 9P Tversion and checks the Rversion. Facts the test checks
// are appended as key=value lines to -report; "listening PORT" goes to stdout.
package main

import (
	"bufio"
	"crypto/rand"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/gliderlabs/ssh"
	gossh "golang.org/x/crypto/ssh"
)

var (
	listenAddr = flag.String("addr", "127.0.0.1:0", "address to listen on")
	pkFile     = flag.String("pk", "", "authorized key file (first key used)")
	reportFile = flag.String("report", "", "file to append key=value facts to")
)

var reportMu sync.Mutex

func note(format string, args ...interface{}) {
	reportMu.Lock()
	defer reportMu.Unlock()
	if *reportFile == "" {
		return
	}
	f, err := os.OpenFile(*reportFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, format+"\n", args...)
}

func main() {
	flag.Parse()
	text, err := os.ReadFile(*pkFile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gocpud: %v\n", err)
		os.Exit(2)
	}
	authorized, _, _, _, err := gossh.ParseAuthorizedKey(text)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gocpud: %v\n", err)
		os.Exit(2)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gocpud: %v\n", err)
		os.Exit(2)
	}
	hostSigner, err := gossh.NewSignerFromKey(rsaKey)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gocpud: %v\n", err)
		os.Exit(2)
	}
	forwards := &ssh.ForwardedTCPHandler{}
	server := &ssh.Server{
		Version: "linux amd64",
		Handler: handle,
		PublicKeyHandler: func(ctx ssh.Context, key ssh.PublicKey) bool {
			ok := ssh.KeysEqual(key, authorized)
			note("auth user=%s key=%s ok=%v", ctx.User(), key.Type(), ok)
			return ok
		},
		ReversePortForwardingCallback: func(ctx ssh.Context, host string, port uint32) bool {
			note("tcpip-forward bind=%s port=%d", host, port)
			return true
		},
		RequestHandlers: map[string]ssh.RequestHandler{
			"tcpip-forward":        forwards.HandleSSHRequest,
			"cancel-tcpip-forward": forwards.HandleSSHRequest,
		},
	}
	server.AddHostKey(hostSigner)
	listener, err := net.Listen("tcp", *listenAddr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gocpud: %v\n", err)
		os.Exit(2)
	}
	fmt.Printf("listening %d\n", listener.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	_ = server.Serve(listener)
}

// splitWords splits an exec string with POSIX-shell-like quoting (single quotes literal,
// double quotes with \" and \\, backslash outside quotes). Empty words are kept.
func splitWords(s string) []string {
	var words []string
	var cur strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case c == '\'':
			inWord = true
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				cur.WriteString(s[i+1:])
				i = len(s)
			} else {
				cur.WriteString(s[i+1 : i+1+j])
				i += j + 1
			}
		case c == '"':
			inWord = true
			for i++; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) && (s[i+1] == '"' || s[i+1] == '\\') {
					i++
				}
				cur.WriteByte(s[i])
			}
		case c == '\\' && i+1 < len(s):
			inWord = true
			i++
			cur.WriteByte(s[i])
		default:
			inWord = true
			cur.WriteByte(c)
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words
}

func handle(sess ssh.Session) {
	env := sess.Environ()
	names := make([]string, 0, len(env))
	nonce := ""
	for _, kv := range env {
		name := kv
		if i := strings.Index(kv, "="); i >= 0 {
			name = kv[:i]
			if name == "CPUNONCE" {
				nonce = kv[i+1:]
			}
		}
		names = append(names, name)
	}
	note("env names=%s", strings.Join(names, ","))
	note("exec raw=%s", sess.RawCommand())
	words := splitWords(sess.RawCommand())
	port9p := ""
	for len(words) > 0 {
		if strings.HasPrefix(words[0], "-port9p=") {
			port9p = strings.TrimPrefix(words[0], "-port9p=")
			words = words[1:]
		} else if words[0] == "-port9p" && len(words) > 1 {
			port9p = words[1]
			words = words[2:]
		} else {
			break
		}
	}
	if port9p != "" {
		note("ninep=%s", ninepProbe(port9p, nonce))
	}
	if len(words) == 0 {
		fmt.Fprintln(sess.Stderr(), "gocpud: no command")
		_ = sess.Exit(1)
		return
	}
	cmd := exec.Command(words[0], words[1:]...)
	cmd.Env = env
	pty, winCh, isPty := sess.Pty()
	if isPty {
		cmd.Env = append(cmd.Env, "TERM="+pty.Term)
		note("pty term=%s cols=%d rows=%d", pty.Term, pty.Window.Width, pty.Window.Height)
		_ = sess.Exit(runPty(sess, cmd, pty.Window, winCh))
		return
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		_ = sess.Exit(1)
		return
	}
	cmd.Stdout = sess
	cmd.Stderr = sess.Stderr()
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(sess.Stderr(), "gocpud: %v\n", err)
		_ = sess.Exit(1)
		return
	}
	// Not waited for: a client that never sends EOF must not keep the session open.
	go func() {
		_, _ = io.Copy(stdin, sess)
		stdin.Close()
	}()
	signals := make(chan ssh.Signal, 8)
	sess.Signals(signals)
	go forwardSignals(signals, cmd)
	_ = sess.Exit(exitCode(cmd.Wait()))
}

func forwardSignals(signals <-chan ssh.Signal, cmd *exec.Cmd) {
	for sig := range signals {
		note("signal=%s", sig)
		switch sig {
		case ssh.SIGINT:
			_ = cmd.Process.Signal(syscall.SIGINT)
		case ssh.SIGTERM:
			_ = cmd.Process.Signal(syscall.SIGTERM)
		}
	}
}

func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		if status, ok := exitErr.Sys().(syscall.WaitStatus); ok && status.Signaled() {
			return 128 + int(status.Signal())
		}
		return exitErr.ExitCode()
	}
	return 1
}

// ninepProbe plays the remote mount's first steps: dial the forwarded port, write the nonce,
// send Tversion and read the Rversion (noted), then Tattach and read the Rattach (returned).
func ninepProbe(port, nonce string) string {
	conn, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second)
	if err != nil {
		return "dial-error:" + err.Error()
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if len(nonce) != 32 {
		return fmt.Sprintf("bad-nonce-length:%d", len(nonce))
	}
	if _, err := conn.Write([]byte(nonce)); err != nil {
		return "nonce-write-error:" + err.Error()
	}
	version := "9P2000.L"
	msg := make([]byte, 0, 64)
	msg = binary.LittleEndian.AppendUint32(msg, uint32(4+1+2+4+2+len(version)))
	msg = append(msg, 100) // Tversion
	msg = binary.LittleEndian.AppendUint16(msg, 0xFFFF)
	msg = binary.LittleEndian.AppendUint32(msg, 65536)
	msg = binary.LittleEndian.AppendUint16(msg, uint16(len(version)))
	msg = append(msg, version...)
	if _, err := conn.Write(msg); err != nil {
		return "tversion-write-error:" + err.Error()
	}
	r := bufio.NewReader(conn)
	body, err := readMessage(r)
	if err != nil {
		return "rversion-" + err.Error()
	}
	if len(body) < 9 {
		return fmt.Sprintf("rversion-short:%d", len(body))
	}
	kind, tag := body[0], binary.LittleEndian.Uint16(body[1:3])
	msize := binary.LittleEndian.Uint32(body[3:7])
	slen := int(binary.LittleEndian.Uint16(body[7:9]))
	if 9+slen != len(body) {
		return fmt.Sprintf("rversion-bad-string:%d/%d", slen, len(body))
	}
	result := fmt.Sprintf("type=%d tag=%d msize=%d version=%s", kind, tag, msize, body[9:])
	note("ninep=%s", result)

	// Tattach fid=0 afid=NOFID uname="root" aname="" n_uname=0, as the kernel's mount does.
	uname := "root"
	msg = msg[:0]
	msg = binary.LittleEndian.AppendUint32(msg, uint32(4+1+2+4+4+2+len(uname)+2+4))
	msg = append(msg, 104) // Tattach
	msg = binary.LittleEndian.AppendUint16(msg, 1)
	msg = binary.LittleEndian.AppendUint32(msg, 0)
	msg = binary.LittleEndian.AppendUint32(msg, 0xFFFFFFFF)
	msg = binary.LittleEndian.AppendUint16(msg, uint16(len(uname)))
	msg = append(msg, uname...)
	msg = binary.LittleEndian.AppendUint16(msg, 0)
	msg = binary.LittleEndian.AppendUint32(msg, 0)
	if _, err := conn.Write(msg); err != nil {
		return "tattach-write-error:" + err.Error()
	}
	body, err = readMessage(r)
	if err != nil {
		return "rattach-" + err.Error()
	}
	if len(body) != 3+13 {
		return fmt.Sprintf("rattach-bad:type=%d len=%d", body[0], len(body))
	}
	return fmt.Sprintf("attach type=%d tag=%d qidtype=%d", body[0], binary.LittleEndian.Uint16(body[1:3]), body[3])
}

// readMessage reads one 9P message and returns it without its size field.
func readMessage(r io.Reader) ([]byte, error) {
	head := make([]byte, 4)
	if _, err := io.ReadFull(r, head); err != nil {
		return nil, fmt.Errorf("read-error:%v", err)
	}
	size := binary.LittleEndian.Uint32(head)
	if size < 7 || size > 8192 {
		return nil, fmt.Errorf("bad-size:%d", size)
	}
	body := make([]byte, size-4)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, fmt.Errorf("read-error:%v", err)
	}
	return body, nil
}

// runPty runs cmd on a new pseudo-terminal as session leader, copying both ways and applying
// window changes; returns the exit code.
func runPty(sess ssh.Session, cmd *exec.Cmd, win ssh.Window, winCh <-chan ssh.Window) int {
	master, slave, err := openPty()
	if err != nil {
		fmt.Fprintf(sess.Stderr(), "gocpud: pty: %v\n", err)
		return 1
	}
	setSize(master, win)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		slave.Close()
		master.Close()
		fmt.Fprintf(sess.Stderr(), "gocpud: %v\n", err)
		return 1
	}
	slave.Close()
	go func() {
		for w := range winCh {
			note("window-change cols=%d rows=%d", w.Width, w.Height)
			setSize(master, w)
		}
	}()
	go func() { _, _ = io.Copy(master, sess) }()
	_, _ = io.Copy(sess, master)
	code := exitCode(cmd.Wait())
	master.Close()
	return code
}

func ioctl(fd uintptr, req uintptr, arg uintptr) error {
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, arg)
	if errno != 0 {
		return errno
	}
	return nil
}

func openPty() (*os.File, *os.File, error) {
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, nil, err
	}
	unlock := int32(0)
	if err := ioctl(master.Fd(), syscall.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); err != nil {
		master.Close()
		return nil, nil, err
	}
	var n uint32
	if err := ioctl(master.Fd(), syscall.TIOCGPTN, uintptr(unsafe.Pointer(&n))); err != nil {
		master.Close()
		return nil, nil, err
	}
	slave, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		return nil, nil, err
	}
	return master, slave, nil
}

func setSize(f *os.File, w ssh.Window) {
	size := [4]uint16{uint16(w.Height), uint16(w.Width), 0, 0}
	_ = ioctl(f.Fd(), syscall.TIOCSWINSZ, uintptr(unsafe.Pointer(&size)))
}
