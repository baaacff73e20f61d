package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const fluxExprs = "../../config/gitops/flux/health-check-exprs.yaml"

func TestFluxShippedExprs(t *testing.T) {
	exprs, err := os.ReadFile(fluxExprs)
	if err != nil {
		t.Fatal(err)
	}
	stoppedIdle := runtimeJSON(1, `{"observedGeneration":1,"phase":"Not available","reason":"StoppedIdle",`+
		`"message":"Stopped after 60m idle.","conditions":[`+readyFalse+`]}`)
	cases := []struct {
		name, object string
		status       string
		message      string // "" skips the message check
	}{
		{
			name: "runtime running",
			object: runtimeJSON(2, `{"observedGeneration":2,"phase":"Running","reason":"PodReady",`+
				`"message":"Serving.","conditions":[`+readyTrue+`]}`),
			status: "Current",
		},
		{
			name: "runtime starting",
			object: runtimeJSON(1, `{"observedGeneration":1,"phase":"Not available","reason":"Starting",`+
				`"message":"Starting.","conditions":[`+readyFalse+`,`+reconciling+`]}`),
			status: "InProgress",
		},
		{
			name: "runtime blocked",
			object: runtimeJSON(1, `{"observedGeneration":1,"phase":"Not available","reason":"QuotaExceeded",`+
				`"message":"Quota.","conditions":[`+readyFalse+`,`+stalledQuota+`]}`),
			status: "Failed",
		},
		{
			name: "runtime serving but its spec change is blocked",
			object: runtimeJSON(1, `{"observedGeneration":1,"phase":"Running","reason":"PodReady",`+
				`"message":"Serving.","conditions":[`+readyTrue+`,`+stalledQuota+`]}`),
			status: "Failed",
		},
		{
			// Plain kstatus says InProgress here (see TestHealth): the reason these expressions exist.
			name: "runtime stopped idle", object: stoppedIdle, status: "Current",
		},
		{
			name:   "runtime stopped by its user",
			object: strings.Replace(stoppedIdle, `"StoppedIdle"`, `"StoppedByUser"`, 1),
			status: "Current",
		},
		{
			name:   "runtime stopped with its instance",
			object: strings.Replace(stoppedIdle, `"StoppedIdle"`, `"ComputeInstanceStopped"`, 1),
			status: "Current",
		},
		{
			name:   "runtime not available for another reason",
			object: strings.Replace(stoppedIdle, `"StoppedIdle"`, `"PodPending"`, 1),
			status: "InProgress",
		},
		{
			// Flux's own check, before any expression.
			name: "runtime not yet observed",
			object: runtimeJSON(3, `{"observedGeneration":2,"phase":"Running","reason":"PodReady",`+
				`"message":"Serving.","conditions":[`+readyTrue+`]}`),
			status:  "InProgress",
			message: "status.observedGeneration 2 is not metadata.generation 3",
		},
		{
			// Flux skips its check without observedGeneration; the expressions do not.
			name: "runtime status without observedGeneration",
			object: runtimeJSON(1, `{"phase":"Running","reason":"PodReady",`+
				`"message":"Serving.","conditions":[`+readyTrue+`]}`),
			status: "InProgress",
		},
		{
			name: "runtime running but not ready",
			object: runtimeJSON(1, `{"observedGeneration":1,"phase":"Running","reason":"PodReady",`+
				`"message":"Probing.","conditions":[`+readyFalse+`]}`),
			status: "InProgress",
		},
		{
			name: "runtime being deleted",
			object: strings.Replace(runtimeJSON(1, `{"observedGeneration":1,"phase":"Running",`+
				`"conditions":[`+readyTrue+`]}`), `"generation":1`,
				`"generation":1,"deletionTimestamp":"2025-01-01T00:00:00Z"`, 1),
			status: "InProgress",
		},
		{
			name: "runtime with an empty status", object: runtimeJSON(1, `{}`), status: "InProgress",
		},
		{
			// No expression can test for the status field itself: Flux reads the evaluation error
			// as Unknown, and waits on it like InProgress.
			name: "runtime without status", object: runtimeJSON(1, ""),
			status: "Unknown", message: "failed to evaluate the CEL expression",
		},
		{
			// Flux matches by group and kind only.
			name: "runtime of another version",
			object: strings.Replace(runtimeJSON(1, `{"observedGeneration":1,"phase":"Running",`+
				`"conditions":[`+readyTrue+`]}`), "v1alpha1", "v1beta1", 1),
			status: "Current",
		},
		{
			name: "instance running",
			object: instanceJSON(`{"observedGeneration":1,"state":"Running","message":"Running.",` +
				`"conditions":[` + readyTrue + `]}`),
			status: "Current",
		},
		{
			name: "instance stopped",
			object: instanceJSON(`{"observedGeneration":1,"state":"Stopped","message":"Stopped by schedule.",` +
				`"conditions":[` + readyFalse + `]}`),
			status: "Current",
		},
		{
			name: "instance failed",
			object: instanceJSON(`{"observedGeneration":1,"state":"Failed","message":"Quota.",` +
				`"conditions":[` + stalledQuota + `]}`),
			status: "Failed",
		},
		{
			name:   "instance failed without Stalled",
			object: instanceJSON(`{"observedGeneration":1,"state":"Failed","message":"Quota."}`),
			status: "Failed",
		},
		{
			name: "instance stalled while starting",
			object: instanceJSON(`{"observedGeneration":1,"state":"Starting","message":"Quota.",` +
				`"conditions":[` + stalledQuota + `]}`),
			status: "Failed",
		},
		{
			name: "instance restarting",
			object: instanceJSON(`{"observedGeneration":1,"state":"Restarting","message":"Restarting.",` +
				`"conditions":[` + reconciling + `]}`),
			status: "InProgress",
		},
		{
			name:   "instance creating without conditions",
			object: instanceJSON(`{"observedGeneration":1,"state":"Creating"}`),
			status: "InProgress",
		},
		{
			name:   "instance stopped, status of an older generation",
			object: strings.Replace(instanceJSON(`{"observedGeneration":1,"state":"Stopped"}`), `"generation":1`, `"generation":2`, 1),
			status: "InProgress",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			obj, err := readObject(strings.NewReader(tc.object))
			if err != nil {
				t.Fatal(err)
			}
			h, err := fluxHealth(exprs, obj)
			if err != nil {
				t.Fatal(err)
			}
			if h.Status != tc.status || !strings.Contains(h.Message, tc.message) {
				t.Errorf("flux = %+v, want %s %q", h, tc.status, tc.message)
			}
		})
	}
}

// TestFluxOrder pins Flux's evaluation order: inProgress, then failed, then current, and
// InProgress when none is true.
func TestFluxOrder(t *testing.T) {
	obj, err := readObject(strings.NewReader(instanceJSON(`{"observedGeneration":1,"p":true,"f":true,"c":true}`)))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ inProgress, failed, current, want string }{
		{"status.p", "status.f", "status.c", "InProgress"},
		{"!status.p", "status.f", "status.c", "Failed"},
		{"!status.p", "!status.f", "status.c", "Current"},
		{"!status.p", "!status.f", "!status.c", "InProgress"},
		{"status.nope", "status.f", "status.c", "Unknown"},
		{"", "", "status.c", "Current"},
		{"", "", "status.nope", "Unknown"},
	} {
		// Quoted: a bare `!` starts a YAML tag.
		exprs := "- apiVersion: promptflow.dev/v1alpha1\n  kind: ComputeInstance\n  current: '" + tc.current + "'\n"
		if tc.inProgress != "" {
			exprs += "  inProgress: '" + tc.inProgress + "'\n"
		}
		if tc.failed != "" {
			exprs += "  failed: '" + tc.failed + "'\n"
		}
		h, err := fluxHealth([]byte(exprs), obj)
		if err != nil {
			t.Fatal(err)
		}
		if h.Status != tc.want {
			t.Errorf("%q %q %q: got %+v, want %s", tc.inProgress, tc.failed, tc.current, h, tc.want)
		}
	}
}

func TestFluxRun(t *testing.T) {
	var out bytes.Buffer
	in := strings.NewReader(instanceJSON(`{"observedGeneration":1,"state":"Running"}`))
	if err := run([]string{"flux", fluxExprs}, in, &out); err != nil {
		t.Fatal(err)
	}
	if got, want := out.String(), `{"status":"Current","message":"current is true"}`+"\n"; got != want {
		t.Errorf("output = %q, want %q", got, want)
	}

	dir := t.TempDir()
	write := func(name, text string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	const entry = "- apiVersion: promptflow.dev/v1alpha1\n  kind: ComputeInstance\n"
	instance := instanceJSON(`{"state":"Running"}`)
	for _, tc := range []struct {
		name, exprs, input string
	}{
		{"missing file", filepath.Join(dir, "nope.yaml"), instance},
		{"not JSON", fluxExprs, "nope"},
		{"no kind", fluxExprs, `{"apiVersion":"promptflow.dev/v1alpha1","metadata":{"name":"x"}}`},
		{"no matching entry", fluxExprs, `{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x"}}`},
		{"not a list", write("map.yaml", "current: 'true'\n"), instance},
		{"empty list", write("empty.yaml", "[]\n"), instance},
		{"unknown key", write("key.yaml", entry+"  current: 'true'\n  inprogress: 'true'\n"), instance},
		{"no current", write("nocurrent.yaml", entry+"  failed: 'true'\n"), instance},
		{"no apiVersion", write("noapi.yaml", "- kind: ComputeInstance\n  current: 'true'\n"), instance},
		{"bad expression", write("bad.yaml", entry+"  current: 'status.'\n"), instance},
		{"duplicate entry", write("dup.yaml", entry+"  current: 'true'\n"+entry+"  current: 'false'\n"), instance},
	} {
		if err := run([]string{"flux", tc.exprs}, strings.NewReader(tc.input), &bytes.Buffer{}); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
}
