package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const scriptDir = "../../config/gitops/argocd"

// Conditions as the operator writes them; Stalled and Reconciling appear only while True.
const (
	readyTrue    = `{"type":"Ready","status":"True","reason":"PodReady","message":"The runtime is ready."}`
	readyFalse   = `{"type":"Ready","status":"False","reason":"NotRunning","message":"The runtime is not running."}`
	reconciling  = `{"type":"Reconciling","status":"True","reason":"Starting","message":"Starting the runtime pod."}`
	stalledQuota = `{"type":"Stalled","status":"True","reason":"QuotaExceeded","message":"The namespace quota is exhausted."}`
)

func runtimeJSON(generation int, status string) string {
	s := `{"apiVersion":"promptflow.dev/v1alpha1","kind":"PromptFlowRuntime",` +
		`"metadata":{"name":"rt","namespace":"default","generation":` + strconv.Itoa(generation) + `}`
	if status != "" {
		s += `,"status":` + status
	}
	return s + "}"
}

func instanceJSON(status string) string {
	return `{"apiVersion":"promptflow.dev/v1alpha1","kind":"ComputeInstance",` +
		`"metadata":{"name":"ci","namespace":"default","generation":1},"status":` + status + "}"
}

func TestHealth(t *testing.T) {
	cases := []struct {
		name, script, object string
		kstatus              string // "" skips the kstatus check
		argocd, message      string // message "" skips the message check
	}{
		{
			name: "runtime running", script: "promptflowruntime.lua",
			object: runtimeJSON(2, `{"observedGeneration":2,"phase":"Running","reason":"PodReady",`+
				`"message":"Serving.","conditions":[`+readyTrue+`]}`),
			kstatus: "Current", argocd: "Healthy", message: "Serving.",
		},
		{
			name: "runtime starting", script: "promptflowruntime.lua",
			object: runtimeJSON(1, `{"observedGeneration":1,"phase":"Not available","reason":"Starting",`+
				`"message":"Starting.","conditions":[`+readyFalse+`,`+reconciling+`]}`),
			kstatus: "InProgress", argocd: "Progressing", message: "Starting the runtime pod.",
		},
		{
			name: "runtime blocked", script: "promptflowruntime.lua",
			object: runtimeJSON(1, `{"observedGeneration":1,"phase":"Not available","reason":"QuotaExceeded",`+
				`"message":"Quota.","conditions":[`+readyFalse+`,`+stalledQuota+`]}`),
			kstatus: "Failed", argocd: "Degraded", message: "The namespace quota is exhausted.",
		},
		{
			name: "runtime stopped idle", script: "promptflowruntime.lua",
			object: runtimeJSON(1, `{"observedGeneration":1,"phase":"Not available","reason":"StoppedIdle",`+
				`"message":"Stopped after 60m idle.","conditions":[`+readyFalse+`]}`),
			// kstatus has no notion of suspended: with no Stalled/Reconciling it falls back to
			// Ready, and Ready=False reads as InProgress.
			kstatus: "InProgress", argocd: "Suspended", message: "Stopped after 60m idle.",
		},
		{
			name: "runtime not yet observed", script: "promptflowruntime.lua",
			object: runtimeJSON(3, `{"observedGeneration":2,"phase":"Running","reason":"PodReady",`+
				`"message":"Serving.","conditions":[`+readyTrue+`]}`),
			kstatus: "InProgress", argocd: "Progressing",
			message: "Waiting for the operator to observe generation 3",
		},
		{
			name: "runtime without status", script: "promptflowruntime.lua",
			object: runtimeJSON(1, ""),
			argocd: "Progressing", message: "Waiting for the operator to observe generation 1",
		},
		{
			name: "runtime running but not ready", script: "promptflowruntime.lua",
			object: runtimeJSON(1, `{"observedGeneration":1,"phase":"Running","reason":"PodReady",`+
				`"message":"Probing.","conditions":[`+readyFalse+`]}`),
			kstatus: "InProgress", argocd: "Progressing", message: "Probing.",
		},
		{
			name: "instance running", script: "computeinstance.lua",
			object: instanceJSON(`{"observedGeneration":1,"state":"Running","message":"Running.",` +
				`"conditions":[` + readyTrue + `]}`),
			kstatus: "Current", argocd: "Healthy", message: "Running.",
		},
		{
			name: "instance stopped", script: "computeinstance.lua",
			object: instanceJSON(`{"observedGeneration":1,"state":"Stopped","message":"Stopped by schedule.",` +
				`"conditions":[` + readyFalse + `]}`),
			kstatus: "InProgress", argocd: "Suspended", message: "Stopped by schedule.",
		},
		{
			name: "instance failed", script: "computeinstance.lua",
			object: instanceJSON(`{"observedGeneration":1,"state":"Failed","message":"Quota.",` +
				`"conditions":[` + stalledQuota + `]}`),
			kstatus: "Failed", argocd: "Degraded", message: "The namespace quota is exhausted.",
		},
		{
			name: "instance restarting", script: "computeinstance.lua",
			object: instanceJSON(`{"observedGeneration":1,"state":"Restarting","message":"Restarting.",` +
				`"conditions":[` + reconciling + `]}`),
			kstatus: "InProgress", argocd: "Progressing",
		},
		{
			name: "instance stopped without Ready", script: "computeinstance.lua",
			object:  instanceJSON(`{"observedGeneration":1,"state":"Stopped","message":"Stopped."}`),
			kstatus: "Current", argocd: "Suspended",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			obj, err := readObject(strings.NewReader(tc.object))
			if err != nil {
				t.Fatal(err)
			}
			if tc.kstatus != "" {
				h, err := kstatusHealth(obj)
				if err != nil {
					t.Fatal(err)
				}
				if h.Status != tc.kstatus {
					t.Errorf("kstatus = %+v, want %s", h, tc.kstatus)
				}
			}
			script, err := os.ReadFile(filepath.Join(scriptDir, tc.script))
			if err != nil {
				t.Fatal(err)
			}
			h, err := argocdHealth(string(script), obj)
			if err != nil {
				t.Fatal(err)
			}
			if h.Status != tc.argocd || (tc.message != "" && h.Message != tc.message) {
				t.Errorf("argocd = %+v, want %s %q", h, tc.argocd, tc.message)
			}
		})
	}
}

func TestRun(t *testing.T) {
	var out bytes.Buffer
	in := strings.NewReader(instanceJSON(`{"observedGeneration":1,"state":"Running","message":"a <b>"}`))
	if err := run([]string{"argocd", filepath.Join(scriptDir, "computeinstance.lua")}, in, &out); err != nil {
		t.Fatal(err)
	}
	if got, want := out.String(), `{"status":"Healthy","message":"a <b>"}`+"\n"; got != want {
		t.Errorf("output = %q, want %q", got, want)
	}

	for _, tc := range []struct {
		name  string
		args  []string
		input string
	}{
		{"no command", nil, "{}"},
		{"not JSON", []string{"kstatus"}, "nope"},
		{"no kind", []string{"kstatus"}, `{"metadata":{"name":"x"}}`},
		{"missing script", []string{"argocd", "does-not-exist.lua"}, instanceJSON("{}")},
	} {
		if err := run(tc.args, strings.NewReader(tc.input), &bytes.Buffer{}); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
}

func TestArgocdBadScripts(t *testing.T) {
	obj, err := readObject(strings.NewReader(instanceJSON(`{"state":"Running"}`)))
	if err != nil {
		t.Fatal(err)
	}
	for name, script := range map[string]string{
		"syntax error":   `return {`,
		"runtime error":  `return obj.nope.nope`,
		"no table":       `return "Healthy"`,
		"no status":      `return {message = "hi"}`,
		"unknown status": `return {status = "Fine"}`,
		"endless loop":   `while true do end`,
		"no io":          `io.open("/etc/passwd")`,
		"no dofile":      `dofile("/etc/passwd")`,
	} {
		if h, err := argocdHealth(script, obj); err == nil {
			t.Errorf("%s: got %+v, want an error", name, h)
		}
	}
}
