package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/fluxcd/cli-utils/pkg/kstatus/status"
	"github.com/fluxcd/pkg/apis/kustomize"
	fluxcel "github.com/fluxcd/pkg/runtime/cel"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// fluxHealth evaluates obj with Flux's own CEL status reader, built from exprs: a YAML list of
// {apiVersion, kind, current, inProgress, failed}, the shape of a Kustomization's
// spec.healthCheckExprs.
//
// Flux matches an entry by group and kind (the version in apiVersion is ignored; an entry
// without kind covers its whole group), checks status.observedGeneration against
// metadata.generation when both are integers, then evaluates inProgress, failed and current in
// that order against the object's top-level fields; the first true one wins, and none true is
// InProgress. An expression that fails to evaluate, on a field the object lacks for one, makes
// the status Unknown, which Flux waits on like InProgress until its timeout.
func fluxHealth(exprs []byte, obj *unstructured.Unstructured) (health, error) {
	var checks []kustomize.CustomHealthCheck
	// Strict and case-sensitive, as the API server's field validation is: a misspelt key is an
	// error, not a silently missing expression.
	data, err := yaml.YAMLToJSONStrict(exprs)
	if err != nil {
		return health{}, fmt.Errorf("health check expressions: %w", err)
	}
	strict, err := kjson.UnmarshalStrict(data, &checks)
	if err == nil {
		err = errors.Join(strict...)
	}
	if err != nil {
		return health{}, fmt.Errorf("health check expressions: %w", err)
	}
	if len(checks) == 0 {
		return health{}, errors.New("health check expressions: the list is empty")
	}
	for i, c := range checks {
		if c.APIVersion == "" {
			return health{}, fmt.Errorf("health check expressions: entry %d has no apiVersion", i)
		}
	}
	newReader, err := fluxcel.NewStatusReader(checks)
	if err != nil {
		return health{}, fmt.Errorf("health check expressions: %w", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	// For an object in hand the reader needs neither a REST mapper nor a cluster reader.
	rs, err := newReader(nil).ReadStatusForObject(ctx, nil, obj)
	if err != nil {
		return health{}, fmt.Errorf("health check expressions: %w", err)
	}
	if rs.Error != nil {
		return health{Status: rs.Status.String(), Message: rs.Error.Error()}, nil
	}
	// Flux's reader gives no message; say which rule decided.
	h := health{Status: rs.Status.String(), Message: rs.Message}
	if h.Message == "" {
		h.Message = fluxReason(rs.Status, obj)
	}
	return h, nil
}

// fluxReason names the rule of Flux's evaluation order that gave s.
func fluxReason(s status.Status, obj *unstructured.Unstructured) string {
	switch s {
	case status.CurrentStatus:
		return "current is true"
	case status.FailedStatus:
		return "failed is true"
	}
	observed, ok, err := unstructured.NestedInt64(obj.Object, "status", "observedGeneration")
	if err == nil && ok {
		generation, ok, err := unstructured.NestedInt64(obj.Object, "metadata", "generation")
		if err == nil && ok && observed != generation {
			return fmt.Sprintf("status.observedGeneration %d is not metadata.generation %d", observed, generation)
		}
	}
	return "inProgress is true, or no expression is"
}
