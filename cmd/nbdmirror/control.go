package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/nbdmirror/nbdmirror/replicator"
)

// The control API, HTTP+JSON on <run-dir>/control.sock (mode 0600):
//
//	POST /v1/resources/{res}/{verb}  body verbRequest → verbResponse
//	GET  /v1/status?res=R&format=json|text|proc&verbose=1&statistics=1
//	GET  /v1/events?res=R&now=1      one JSON object per line, streamed
//	GET  /v1/wait?res=R&for=connect|sync&timeout=D → verbResponse
//
// {res} is a resource name or all. Every answer that is not a stream is a
// JSON object; an error answer carries the exit code the CLI ends with.

// apiVersion is the path prefix of this version of the control API.
const apiVersion = "/v1"

// verbRequest carries a verb's options.
type verbRequest struct {
	Force         bool `json:"force,omitempty"`
	ClearBitmap   bool `json:"clear_bitmap,omitempty"`
	DiscardMyData bool `json:"discard_my_data,omitempty"`
	// KeepBitmap is invalidate's --reset-bitmap=no: resync only the
	// blocks already marked.
	KeepBitmap bool `json:"keep_bitmap,omitempty"`
	// VerifyStart and VerifyStop are verify's --start and --stop, in
	// 512-byte sectors.
	VerifyStart *uint64 `json:"verify_start,omitempty"`
	VerifyStop  *uint64 `json:"verify_stop,omitempty"`
	// Resize's options: Size in bytes (0: the most both disks hold).
	Size               int64 `json:"size,omitempty"`
	AssumePeerHasSpace bool  `json:"assume_peer_has_space,omitempty"`
	AssumeClean        bool  `json:"assume_clean,omitempty"`
	AllowShrink        bool  `json:"allow_shrink,omitempty"`
}

// verbResult is one resource's outcome.
type verbResult struct {
	Resource string `json:"resource"`
	Error    string `json:"error,omitempty"`
	Code     int    `json:"code"` // the exit code it maps to, 0 on success
	// Message is what a verb that reports (resize, adjust) says on
	// success, one line per item.
	Message string `json:"message,omitempty"`
}

type verbResponse struct {
	Results []verbResult `json:"results"`
}

// errorResponse is any failed request that is not about one resource.
type errorResponse struct {
	Error string `json:"error"`
	Code  int    `json:"code"`
}

func (d *daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+apiVersion+"/resources/{res}/{verb}", d.handleVerb)
	mux.HandleFunc("GET "+apiVersion+"/status", d.handleStatus)
	mux.HandleFunc("GET "+apiVersion+"/events", d.handleEvents)
	mux.HandleFunc("GET "+apiVersion+"/wait", d.handleWait)
	// Anything else (another path, or a method a path does not take)
	// gets a JSON answer too, not net/http's text page.
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		apiError(w, http.StatusNotFound, ExitUsage, "no such request: %s %s", req.Method, req.URL.Path)
	})
	return mux
}

// closeAfterReply ends every control connection after its reply, and a
// body the handler did not read (a GET's, a refused request's) is not
// waited for: net/http would read up to 256 KiB of it with no deadline
// (a client that declares a body and sends none would hold the
// connection, and the daemon's stop, for ever). No idle connection stays
// either; the command line makes one request per connection.
func closeAfterReply(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Connection", "close")
		h.ServeHTTP(w, req)
		http.NewResponseController(w).SetReadDeadline(time.Now())
	})
}

// controlBodyTimeout bounds the reading of a request's body: a client that
// declares more than it sends is answered, and its handler freed, then.
var controlBodyTimeout = 10 * time.Second

// maxControlBody bounds a request's body; verbRequest needs a few hundred
// bytes.
const maxControlBody = 64 << 10

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func apiError(w http.ResponseWriter, status, code int, format string, args ...any) {
	writeJSON(w, status, errorResponse{Error: fmt.Sprintf(format, args...), Code: code})
}

// resources resolves ?res= or {res}: a name or all.
func (d *daemon) resourcesFor(w http.ResponseWriter, name string) ([]*resource, bool) {
	if name == "" {
		name = "all"
	}
	rs := d.select_(name)
	if rs == nil {
		apiError(w, http.StatusNotFound, ExitConfigInvalid, "%s: no such resource in %s", name, d.cfg.Files[0])
		return nil, false
	}
	return rs, true
}

// verbs are the admin verbs that change state, by name.
var verbs = map[string]func(d *daemon, ctx context.Context, r *resource, o verbRequest) error{
	"up":     func(d *daemon, _ context.Context, r *resource, _ verbRequest) error { return r.up() },
	"attach": func(d *daemon, _ context.Context, r *resource, _ verbRequest) error { return r.Attach() },
	"down": func(d *daemon, ctx context.Context, r *resource, _ verbRequest) error {
		return r.down(ctx, d.log)
	},
	"detach":  func(d *daemon, _ context.Context, r *resource, _ verbRequest) error { return r.Detach() },
	"primary": func(d *daemon, _ context.Context, r *resource, o verbRequest) error { return r.promote(o.Force, d.log) },
	"secondary": func(d *daemon, ctx context.Context, r *resource, _ verbRequest) error {
		return r.demote(ctx, d.log)
	},
	"new-current-uuid": func(d *daemon, _ context.Context, r *resource, o verbRequest) error {
		return r.NewCurrentUUID(o.ClearBitmap)
	},
	"invalidate": func(d *daemon, _ context.Context, r *resource, o verbRequest) error {
		return r.Invalidate(!o.KeepBitmap)
	},
	"invalidate-remote": func(d *daemon, _ context.Context, r *resource, o verbRequest) error {
		return r.InvalidateRemote(!o.KeepBitmap)
	},
	"connect": func(d *daemon, _ context.Context, r *resource, o verbRequest) error {
		return r.Connect(o.DiscardMyData)
	},
	"disconnect": func(d *daemon, _ context.Context, r *resource, _ verbRequest) error { return r.Disconnect() },
	"verify": func(d *daemon, _ context.Context, r *resource, o verbRequest) error {
		return r.Verify(replicator.VerifyRange{Start: o.VerifyStart, Stop: o.VerifyStop})
	},
	"pause-sync":  func(d *daemon, _ context.Context, r *resource, _ verbRequest) error { return r.PauseSync() },
	"resume-sync": func(d *daemon, _ context.Context, r *resource, _ verbRequest) error { return r.ResumeSync() },
	"resume-io":   func(d *daemon, _ context.Context, r *resource, _ verbRequest) error { return r.ResumeIO() },
}

func (d *daemon) handleVerb(w http.ResponseWriter, req *http.Request) {
	verb := req.PathValue("verb")
	do, ok := verbs[verb]
	say, says := messageVerbs[verb] // resize.go
	if !ok && !says {
		apiError(w, http.StatusNotFound, ExitUsage, "no verb %q", verb)
		return
	}
	// The whole body is read, within controlBodyTimeout, before the verb
	// runs: a client that declares more than it sends is answered then.
	if err := http.NewResponseController(w).SetReadDeadline(time.Now().Add(controlBodyTimeout)); err != nil {
		apiError(w, http.StatusInternalServerError, ExitFailed, "request body: %v", err)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, req.Body, maxControlBody))
	if err != nil {
		bodyError(w, err)
		return
	}
	// The verb may take long: the connection's reads are no longer
	// bounded (net/http watches it for the client going away).
	if err := http.NewResponseController(w).SetReadDeadline(time.Time{}); err != nil {
		apiError(w, http.StatusInternalServerError, ExitFailed, "request body: %v", err)
		return
	}
	var o verbRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&o); err != nil && !errors.Is(err, io.EOF) {
		bodyError(w, err)
		return
	}
	if dec.More() {
		apiError(w, http.StatusBadRequest, ExitUsage, "request body: more than one JSON object")
		return
	}
	rs, ok := d.resourcesFor(w, req.PathValue("res"))
	if !ok {
		return
	}
	d.ops.RLock()
	defer d.ops.RUnlock()
	if d.stopping {
		apiError(w, http.StatusServiceUnavailable, ExitRefused, "the daemon is stopping")
		return
	}
	var resp verbResponse
	for _, r := range rs {
		res := verbResult{Resource: r.Name()}
		var err error
		if says {
			res.Message, err = say(d, r, o)
		} else {
			err = do(d, req.Context(), r, o)
		}
		if err != nil {
			res.Error, res.Code = verbError(r.Name(), err)
			d.log.Warn("admin request refused", "verb", verb, "resource", r.Name(), "err", res.Error)
		} else {
			d.log.Info("admin request done", "verb", verb, "resource", r.Name())
		}
		resp.Results = append(resp.Results, res)
	}
	writeJSON(w, http.StatusOK, resp)
}

// bodyError answers a request whose body could not be read or decoded.
func bodyError(w http.ResponseWriter, err error) {
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		apiError(w, http.StatusRequestEntityTooLarge, ExitUsage, "request body: larger than %d bytes", tooLarge.Limit)
	case errors.Is(err, os.ErrDeadlineExceeded):
		apiError(w, http.StatusRequestTimeout, ExitUsage, "request body: not complete within %v", controlBodyTimeout)
	case errors.Is(err, io.ErrUnexpectedEOF):
		apiError(w, http.StatusBadRequest, ExitUsage, "request body: truncated")
	default:
		apiError(w, http.StatusBadRequest, ExitUsage, "request body: %v", err)
	}
}

// verbError maps a verb's error to its one-line message and exit code.
func verbError(res string, err error) (string, int) {
	var se *replicator.StateError
	switch {
	case errors.Is(err, replicator.ErrVerifyRange):
		return err.Error(), ExitUsage
	case errors.Is(err, replicator.ErrResize):
		return err.Error(), ExitRefused
	case errors.As(err, &se) && se.NoUpToDateData():
		return err.Error(), ExitNoUpToDateData
	case errors.As(err, &se):
		return err.Error(), ExitRefused
	}
	// Metadata errors get metaErr's code and remedy; the resource's own
	// "r0: " prefix is not repeated.
	var ee *exitError
	if errors.As(metaErr(res, nil, err), &ee) {
		return strings.Replace(ee.Error(), res+": "+res+": ", res+": ", 1), ee.code
	}
	return err.Error(), ExitFailed
}

func (d *daemon) handleStatus(w http.ResponseWriter, req *http.Request) {
	rs, ok := d.resourcesFor(w, req.URL.Query().Get("res"))
	if !ok {
		return
	}
	snaps := make([]replicator.Snapshot, 0, len(rs))
	for _, r := range rs {
		snaps = append(snaps, r.Snapshot())
	}
	q := req.URL.Query()
	var b bytes.Buffer
	switch q.Get("format") {
	case "", "json":
		out := make([]replicator.StatusJSON, 0, len(snaps))
		for _, s := range snaps {
			out = append(out, replicator.NewStatusJSON(s))
		}
		writeJSON(w, http.StatusOK, out)
		return
	case "text":
		replicator.WriteStatus(&b, snaps, q.Get("verbose") == "1", q.Get("statistics") == "1")
	case "proc":
		replicator.WriteProc(&b, procInfo(), snaps)
	default:
		apiError(w, http.StatusBadRequest, ExitUsage, "format %q: want json, text or proc", q.Get("format"))
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write(b.Bytes())
}

// handleEvents streams state changes, one JSON object per line; with
// now=1 the current state of each resource comes first.
func (d *daemon) handleEvents(w http.ResponseWriter, req *http.Request) {
	rs, ok := d.resourcesFor(w, req.URL.Query().Get("res"))
	if !ok {
		return
	}
	names := map[string]bool{}
	for _, r := range rs {
		names[r.Name()] = true
	}
	ch := d.events.subscribe()
	defer d.events.unsubscribe(ch)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	fl, _ := w.(http.Flusher)
	if req.URL.Query().Get("now") == "1" {
		for _, r := range rs {
			w.Write(eventLine("exists", r.Snapshot()))
		}
	}
	if fl != nil {
		fl.Flush()
	}
	for {
		select {
		case <-req.Context().Done():
			return
		case line, ok := <-ch:
			if !ok {
				if !d.events.stopped() { // this reader fell behind
					w.Write([]byte(`{"event":"overflow","error":"the events came faster than they were read"}` + "\n"))
				}
				return
			}
			var e struct {
				Name string `json:"name"`
			}
			if json.Unmarshal(line, &e) == nil && !names[e.Name] {
				continue
			}
			if _, err := w.Write(line); err != nil {
				return
			}
			if fl != nil {
				fl.Flush()
			}
		}
	}
}

// handleWait waits until every selected resource is connected (for =
// connect) or connected with no resync running or due (for = sync), or the
// timeout passes.
func (d *daemon) handleWait(w http.ResponseWriter, req *http.Request) {
	q := req.URL.Query()
	rs, ok := d.resourcesFor(w, q.Get("res"))
	if !ok {
		return
	}
	var done func(replicator.Snapshot) bool
	switch q.Get("for") {
	case "connect":
		done = func(s replicator.Snapshot) bool { return s.Conn >= replicator.Connected }
	case "sync":
		// As drbdadm's: connected, and no resync running or due (a disk
		// still Inconsistent on either side is waiting for one).
		done = func(s replicator.Snapshot) bool {
			return s.Conn == replicator.Connected && s.Disk != replicator.Inconsistent && s.PeerDisk != replicator.Inconsistent
		}
	default:
		apiError(w, http.StatusBadRequest, ExitUsage, "for=%q: want connect or sync", q.Get("for"))
		return
	}
	if q.Get("timeout") == "" { // StandAlone does not try: waiting for ever would hang
		for _, r := range rs {
			if s := r.Snapshot(); s.Conn == replicator.StandAlone {
				writeJSON(w, http.StatusOK, verbResponse{Results: []verbResult{{Resource: r.Name(), Code: ExitRefused,
					Error: r.Name() + ": StandAlone: it is not trying to connect, so there is nothing to wait for"}}})
				return
			}
		}
	}
	ctx := req.Context()
	if t := q.Get("timeout"); t != "" {
		d, err := time.ParseDuration(t)
		if err != nil || d < 0 {
			apiError(w, http.StatusBadRequest, ExitUsage, "timeout %q: want a duration such as 30s", t)
			return
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d)
		defer cancel()
	}
	ch := d.events.subscribe()
	defer d.events.unsubscribe(ch)
	var resp verbResponse
	for _, r := range rs {
		res := verbResult{Resource: r.Name()}
		for !done(r.Snapshot()) {
			select {
			case <-ctx.Done():
				res.Code = ExitTimeout
				res.Error = fmt.Sprintf("%s: still %s after %s", r.Name(), r.Snapshot().Conn, q.Get("timeout"))
			case _, ok := <-ch:
				if !ok {
					res.Code, res.Error = ExitFailed, r.Name()+": the daemon is stopping"
				}
			}
			if res.Code != 0 {
				break
			}
		}
		resp.Results = append(resp.Results, res)
	}
	writeJSON(w, http.StatusOK, resp)
}
