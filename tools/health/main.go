// Command pf-health evaluates the health of one live Kubernetes object the way GitOps tools do:
// with kstatus (Flux, cli-utils), with a Flux Kustomization's CEL health check expressions, or
// with an Argo CD Lua health script.
//
//	kubectl get pfrt NAME -o json | pf-health kstatus
//	kubectl get pfrt NAME -o json | pf-health flux config/gitops/flux/health-check-exprs.yaml
//	kubectl get pfrt NAME -o json | pf-health argocd config/gitops/argocd/promptflowruntime.lua
//
// It prints one JSON line {"status":"...","message":"..."} and exits non-zero only when the input
// or the script is bad, or no expression covers the object's kind.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

const usage = `usage:
  pf-health kstatus            < object.json
  pf-health flux EXPRS.yaml    < object.json
  pf-health argocd SCRIPT.lua  < object.json`

// health is what every evaluator prints.
type health struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "pf-health:", err)
		os.Exit(1)
	}
}

func run(args []string, stdin io.Reader, stdout io.Writer) error {
	var (
		h   health
		err error
	)
	switch {
	case len(args) == 1 && args[0] == "kstatus":
		var obj *unstructured.Unstructured
		if obj, err = readObject(stdin); err == nil {
			h, err = kstatusHealth(obj)
		}
	case len(args) == 2 && args[0] == "flux":
		var exprs []byte
		if exprs, err = os.ReadFile(args[1]); err != nil {
			return err
		}
		var obj *unstructured.Unstructured
		if obj, err = readObject(stdin); err == nil {
			h, err = fluxHealth(exprs, obj)
		}
	case len(args) == 2 && args[0] == "argocd":
		var script []byte
		if script, err = os.ReadFile(args[1]); err != nil {
			return err
		}
		var obj *unstructured.Unstructured
		if obj, err = readObject(stdin); err == nil {
			h, err = argocdHealth(string(script), obj)
		}
	default:
		return errors.New(usage)
	}
	if err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	enc.SetEscapeHTML(false)
	return enc.Encode(h)
}

// readObject decodes exactly one JSON object. The unstructured decoder keeps integers as int64,
// which the metadata accessors (generation, for one) require.
func readObject(r io.Reader) (*unstructured.Unstructured, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(data); err != nil {
		return nil, fmt.Errorf("reading the object: %w", err)
	}
	if obj.IsList() {
		return nil, errors.New("reading the object: got a list, want one object")
	}
	return obj, nil
}

// kstatusHealth computes the object's status with kstatus.
func kstatusHealth(obj *unstructured.Unstructured) (health, error) {
	res, err := status.Compute(obj)
	if err != nil {
		return health{}, fmt.Errorf("kstatus: %w", err)
	}
	return health{Status: res.Status.String(), Message: res.Message}, nil
}
